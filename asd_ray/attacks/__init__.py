"""Backdoor attacks: one module per attack (pure image functions) and poison.py (shards + ground truth)."""
