"""The benchmarks run (their figures are measured by hand and recorded in docs/benchmarks.md)."""

import argparse

from tests.conftest import TINY_DATA
from vlm.bench import data, generation


def test_generation_benchmark_decodes_the_same_tokens_as_transformers(capsys):
    args = argparse.Namespace(
        batch=2, prompt_tokens=6, new_tokens=8, hidden=64, layers=1, repeats=1, threads=0
    )
    generation.run(args)
    out = capsys.readouterr().out
    assert "identical token sequences: 2/2" in out and "tokens/s" in out


def test_data_benchmark_reports_both_rates(capsys, data_dir):
    overrides = [*TINY_DATA, f"paths.data_dir={data_dir}", "sizes=tiny"]
    data.run(argparse.Namespace(samples=16, threads=1, repeats=1, overrides=overrides))
    out = capsys.readouterr().out
    assert "pipeline (1 worker)" in out and "raw decode + resize" in out and "pipeline overhead" in out
