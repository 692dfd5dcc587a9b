"""Shared by the model tests: a batch of rendered-text samples for any model, and one training step."""

import io
import json

import torch
from PIL import Image

from vlm import IMAGE_TOKEN
from vlm.data.processing import Collator, SampleProcessor


def raw_sample(key: str, answer: str) -> dict:
    """One sample in the shard schema: a blank 512x32 page, an OCR prompt, `answer`."""
    buffer = io.BytesIO()
    Image.new("RGB", (512, 32), "white").save(buffer, format="PNG")
    record = {"prompt": f"{IMAGE_TOKEN}\nRead the text.", "answers": [answer], "task": "ocr"}
    return {"__key__": key, "json": json.dumps(record).encode(), "png": buffer.getvalue()}


def make_batch(model, answers: list[str]) -> dict:
    """A collated training batch for `model`'s encoder and tokenizer, with its placeholders."""
    process = SampleProcessor(model.tokenizer, model.encoder.preprocessing, model.vision_tokens_per_image)
    return Collator(model.tokenizer.pad_id)([process(raw_sample(f"s{i}", a)) for i, a in enumerate(answers)])


def train_step(module, batch: dict, lr: float = 1e-3) -> set[str]:
    """One AdamW step on `module.loss` (asserted finite); the names of the parameters it changed."""
    model = module.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    loss, _ = module.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
