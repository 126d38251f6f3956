"""Fused per-candidate log-probs: one module per backend, ``reference.py`` first (it states the contract)."""
