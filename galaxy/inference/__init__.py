"""Inference beyond one forward pass: greedy decoding with a KV cache in every layout (generate)."""
