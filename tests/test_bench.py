"""The benchmarks run (their figures are measured by hand and recorded in docs/benchmarks.md)."""

import argparse
import math
import re

import pytest

from tests.conftest import TINY_DATA
from vlm.bench import data, generation, train


def test_generation_benchmark_decodes_the_same_tokens_as_transformers(capsys):
    args = argparse.Namespace(
        batch=2, prompt_tokens=6, new_tokens=8, hidden=64, layers=1, repeats=1, threads=0, device="cpu"
    )
    generation.run(args)
    out = capsys.readouterr().out
    assert "identical token sequences: 2/2" in out and "tokens/s" in out


def test_data_benchmark_reports_both_rates(capsys, data_dir):
    overrides = [*TINY_DATA, f"paths.data_dir={data_dir}", "sizes=tiny"]
    data.run(argparse.Namespace(samples=16, threads=1, repeats=1, overrides=overrides))
    out = capsys.readouterr().out
    assert "pipeline (1 worker)" in out and "raw decode + resize" in out and "pipeline overhead" in out


TINY_TRAIN = [
    "encoder.image_size=[64,64]",
    "encoder.model_kwargs={embed_dim:32,depth:1,num_heads:2}",
    "resampler.factor=2",
    "llm.config.hidden_size=32",
    "llm.config.intermediate_size=64",
    "llm.config.num_hidden_layers=1",
    "llm.config.num_attention_heads=2",
    "llm.config.num_key_value_heads=1",
    "llm.config.vocab_size=300",
]


def train_args(*config: str) -> argparse.Namespace:
    return argparse.Namespace(
        config=[*TINY_TRAIN, *config],
        batch=2,
        text_tokens=8,
        steps=1,
        warmup=1,
        repeats=2,
        threads=0,
        device="cpu",
        dtype="float32",
        compile=False,
    )


def test_train_benchmark_times_ours_against_idefics3_of_equal_size(capsys):
    train.run(train_args())
    out = capsys.readouterr().out
    counts = re.search(r"parameters: ours ([\d,]+), transformers ([\d,]+) \(equal", out)
    assert counts and counts[1] == counts[2], out
    assert re.search(r"^ours: +\d+ tokens/s, peak +[\d.]+ MiB", out, re.M), out
    assert re.search(r"^transformers: +\d+ tokens/s, peak +[\d.]+ MiB", out, re.M), out
    ratio = float(re.search(r"ours / transformers: ([\d.]+)x tokens/s", out)[1])
    assert math.isfinite(ratio) and ratio > 0
    assert "2 x (4 image + 8 text tokens)" in out


def test_train_benchmark_refuses_a_model_idefics3_cannot_mirror():
    with pytest.raises(ValueError, match=r"projector=linear projector\.bias=false \(Idefics3's connector\)"):
        train.run(train_args("projector.bias=true"))
