"""Plumbing that every layer may use and that imports nothing of minituner: atomic files,
JSONL, typed configs, plots."""
