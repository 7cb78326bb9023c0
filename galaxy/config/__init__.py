"""Run configs: JSON files composed of parts ("include"), every key typed and checked at load
(load.py: SCHEMA, load_config)."""
