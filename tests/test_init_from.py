"""init_from: a run's parts start from another run's checkpoint, strictly, and the rest stays fresh."""

from __future__ import annotations

import pytest
import torch

from vlm.checkpoint import load_weights_only
from vlm.models.pretrained import CheckpointMismatchError
from vlm.training.checkpointing import init_parts
from vlm.training.module import VLMModule


def test_the_llm_comes_from_the_checkpoint_and_the_encoder_stays_fresh(make_cfg, tiny_checkpoint):
    module = VLMModule(make_cfg("seed=1"))
    fresh_encoder = {k: v.clone() for k, v in module.model.encoder.state_dict().items()}
    saved = load_weights_only(tiny_checkpoint)["state_dict"]
    llm_keys = [k for k in saved if k.startswith("model.llm.")]
    assert llm_keys
    # the fresh LLM differs from the trained one, so the equality below says something
    assert any(not torch.equal(module.state_dict()[k], saved[k]) for k in llm_keys)

    init_parts(module, tiny_checkpoint, ["llm"])

    state = module.state_dict()
    for key in llm_keys:
        assert torch.equal(state[key], saved[key]), key
    for key, value in module.model.encoder.state_dict().items():
        assert torch.equal(value, fresh_encoder[key]), key


def test_all_parts_give_the_whole_model(make_cfg, tiny_checkpoint):
    module = VLMModule(make_cfg("seed=1"))
    init_parts(module, tiny_checkpoint, ["all"])
    saved = load_weights_only(tiny_checkpoint)["state_dict"]
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, saved[f"model.{key}"]), key


def test_a_mis_shaped_llm_is_an_error_naming_the_key(make_cfg, tiny_checkpoint):
    module = VLMModule(make_cfg("llm.n_embd=48", "llm.n_head=2", "llm.n_kv_head=2"))
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped: .*model\.llm\.transformer\.wte\.weight"):
        init_parts(module, tiny_checkpoint, ["llm"])


def test_unknown_parts_and_another_tokenizer_are_refused(make_cfg, tiny_checkpoint, tmp_path):
    module = VLMModule(make_cfg())
    with pytest.raises(ValueError, match=r"init_from.parts=\['decoder'\]"):
        init_parts(module, tiny_checkpoint, ["decoder"])
    other = load_weights_only(tiny_checkpoint)
    other["tokenizer"] = '{"not": "this run\'s tokenizer"}'
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="its tokenizer is not this run's LLM tokenizer"):
        init_parts(module, tmp_path / "other.ckpt", ["llm"])
    init_parts(module, tmp_path / "other.ckpt", ["encoder"])  # no LLM taken: its tokenizer does not matter


def test_train_starts_from_init_from(make_cfg, tiny_checkpoint, monkeypatch):
    from vlm.app import run

    calls = []
    monkeypatch.setattr(run, "init_parts", lambda module, ckpt, parts: calls.append((ckpt, parts)))
    run.train(
        make_cfg(
            f"init_from.ckpt={tiny_checkpoint}",
            "init_from.parts=[llm,projector]",
            "trainer.max_steps=1",
            "test=false",
        )
    )
    assert calls == [(str(tiny_checkpoint), ["llm", "projector"])]
