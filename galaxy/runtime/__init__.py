"""Processes: launching ranks (--world/--rank, torchrun's environment, a local spawn), signals,
naming lost peers and regrouping (health), elastic restarts and re-planning for survivors (elastic)."""
