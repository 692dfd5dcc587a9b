"""Benchmarks (not tests): `python -m vlm.app.bench <name> [options]`; results go to docs/benchmarks.md."""
