"""LoRA through peft on both LLM backends: only the adapters (and the trained parts around the LLM)
move in a step; merging gives the same outputs without adapter layers."""

import lightning as L
import pytest
import torch

from tests.steps import make_batch, train_step
from vlm.models.llms.lora import ADAPTER, adapter_state_dict, has_lora, merge_lora
from vlm.training.checkpointing import merge_lora_checkpoint
from vlm.training.module import VLMModule


def lora_module(make_cfg, llm: str) -> VLMModule:
    torch.manual_seed(0)
    return VLMModule(make_cfg(f"llm={llm}", "stage=sft_lora", "llm.lora.r=4", "loss.ctc_weight=0"))


@pytest.mark.parametrize("llm", ["tiny", "smollm2_135m"])
def test_only_adapters_change_in_the_llm(make_cfg, llm):
    module = lora_module(make_cfg, llm)
    model = module.model
    assert has_lora(model.llm) and adapter_state_dict(model.llm)
    trainable = {name for name, p in model.llm.named_parameters() if p.requires_grad}
    assert trainable and all(ADAPTER in name for name in trainable)
    changed = train_step(module, make_batch(model, ["some words", "some words"]), lr=1e-2)
    llm_changed = {name for name in changed if name.startswith("llm.")}
    assert llm_changed and all(ADAPTER in name for name in llm_changed)
    assert any(name.startswith("projector.") for name in changed)
    assert not any(name.startswith("encoder.") for name in changed)  # sft: encoder frozen


@pytest.mark.parametrize("llm", ["tiny", "smollm2_135m"])
def test_merged_adapters_give_the_same_logits(make_cfg, llm, tmp_path):
    module = lora_module(make_cfg, llm)
    batch = make_batch(module.model, ["some words", "some words"])
    train_step(module, batch, lr=1e-2)  # lora_B starts at zero: a step makes the adapters matter
    module.eval()
    with torch.no_grad():
        adapted = module.model(batch["input_ids"], batch["pixel_values"]).logits
    checkpoint = tmp_path / "lora.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        checkpoint,
    )
    merge_lora_checkpoint(str(checkpoint), str(tmp_path / "merged.ckpt"))
    merged = VLMModule.load_from_checkpoint(
        tmp_path / "merged.ckpt", map_location="cpu", weights_only=False
    ).eval()
    assert not has_lora(merged.model)
    assert merged.cfg.model.llm.lora.r == 0
    with torch.no_grad():
        assert torch.allclose(
            merged.model(batch["input_ids"], batch["pixel_values"]).logits, adapted, atol=1e-4
        )
        in_place = merge_lora(module.model)
        assert not has_lora(in_place)
        assert torch.allclose(in_place(batch["input_ids"], batch["pixel_values"]).logits, adapted, atol=1e-4)


def test_lora_matching_nothing_is_a_clear_error(make_cfg):
    with pytest.raises(Exception, match=r"target_modules=\['nope'\] matched no linear layer"):
        VLMModule(make_cfg("stage=sft_lora", "llm.lora.r=4", "llm.lora.target_modules=[nope]"))
