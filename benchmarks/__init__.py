"""Benchmarks for meshlib: see benchmarks/run.py and docs/performance.md."""
