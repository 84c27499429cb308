"""Atomic resumable checkpoints (store.py) and plain-HF export with LoRA merge (export.py)."""
