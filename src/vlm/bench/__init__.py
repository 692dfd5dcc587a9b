"""Benchmarks (not tests): `python -m vlm.bench <name> [options]`; results go to docs/benchmarks.md."""
