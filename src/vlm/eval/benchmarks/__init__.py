"""Benchmarks: each turns generated predictions into metrics and files in the run directory."""
