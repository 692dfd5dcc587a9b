"""The GPU check (`python -m vlm.app.bench gpu`, `make gpu-check`): what can be checked without a GPU."""

import argparse
import subprocess
import sys

import pytest
import torch

from tests.conftest import OFFLINE_ENV
from vlm.bench import gpu
from vlm.config import compose
from vlm.training.module import VLMModule


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_it_refuses_without_cuda_and_says_why():
    done = subprocess.run(
        [sys.executable, "-m", "vlm.app.bench", "gpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, **OFFLINE_ENV},
    )
    assert done.returncode != 0
    assert "the GPU check needs a CUDA device" in done.stderr


@pytest.mark.parametrize("recipe", list(gpu.OFFICIAL))
def test_the_official_recipes_compose_at_their_released_sizes_without_files(recipe):
    """Built on the meta device (no memory, no weights): the sizes are the released ones."""
    cfg = compose("train", ["hydra.run.dir=.", "logger=csv", *gpu.OFFICIAL[recipe]])
    with torch.device("meta"):
        module = VLMModule(cfg)
    llm = sum(p.numel() for p in module.model.llm.parameters())
    expected = {"deepseek_ocr": 560e6, "nanovlm": 134.5e6}[recipe]  # nanochat d20; SmolLM2-135M (tied)
    assert llm == pytest.approx(expected, rel=0.02)


def test_the_training_figures_run_packed_and_unpacked_at_test_sizes():
    args = argparse.Namespace(batch=4, text_min=8, text_max=40, steps=1, repeats=1)
    rows = gpu.train_figures("tiny", ["sizes=tiny"], args, torch.device("cpu"))
    assert [row["layout"] for row in rows] == ["unpacked", "packed"]
    unpacked, packed = rows
    assert float(packed["padding"].rstrip("%")) < float(unpacked["padding"].rstrip("%"))
    assert int(packed["rows x length"].split("x")[0]) < 4  # rows hold several samples
    assert unpacked["MFU"] == "n/a" and unpacked["peak GiB"] == "n/a"  # CUDA only
    assert gpu.markdown(rows).count("\n") == 3
