"""Benchmarks: `python -m benchmarks.run` writes BENCHMARKS.md (see benchmarks/run.py)."""
