"""Every configured option of each swappable part offers what its protocol in vlm.contracts says."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from vlm.contracts import ImageEncoder, LanguageModel, Projector, Tokenizer, TokenResampler
from vlm.models.llms.tokenizer import ByteTokenizer
from vlm.models.vlm import VisionLanguageModel

from .test_config import options


def build(make_cfg, *overrides: str) -> VisionLanguageModel:
    return instantiate(make_cfg(*overrides).model)


@pytest.mark.parametrize("encoder", options("encoder"))
def test_every_encoder_meets_its_protocol(make_cfg, encoder):
    model = build(make_cfg, f"encoder={encoder}", "resampler=identity")
    assert isinstance(model.encoder, ImageEncoder), encoder


@pytest.mark.parametrize("resampler", options("resampler"))
def test_every_resampler_and_projector_meets_its_protocol(make_cfg, resampler):
    for projector in options("projector"):
        model = build(make_cfg, f"resampler={resampler}", f"projector={projector}")
        assert isinstance(model.resampler, TokenResampler), resampler
        assert isinstance(model.projector, Projector), projector


@pytest.mark.parametrize("llm", options("llm"))
def test_every_llm_and_its_tokenizer_meet_their_protocols(make_cfg, llm):
    model = build(make_cfg, f"llm={llm}")
    assert isinstance(model.llm, LanguageModel), llm
    assert isinstance(model.llm.tokenizer, Tokenizer), llm


def test_a_part_missing_a_member_does_not_meet_the_protocol():
    class NoDecode:
        bos_id = eos_id = pad_id = image_token_id = 0
        vocab_size = 1
        stop_ids = (0,)

        def encode(self, text):
            return []

        def format_prompt(self, text):
            return text

    assert isinstance(ByteTokenizer(), Tokenizer) and not isinstance(NoDecode(), Tokenizer)


def test_every_collators_batch_is_a_batch(make_cfg):
    """The keys of what each collator gives are `Batch`'s, with the required ones always there: plain,
    packed, per source, for generation (with a failed item), and a text arm's (its context rows)."""
    from typing import get_type_hints

    from tests.steps import raw_sample
    from vlm.contracts import Batch
    from vlm.data.loading import SourceCollator
    from vlm.data.processing import Collator, PackingCollator, SampleProcessor
    from vlm.eval.runner import GenerationCollator

    known = set(get_type_hints(Batch))
    required = set(Batch.__required_keys__)
    assert {"input_ids", "labels", "pixel_values", "keys"} <= required and "segment_ids" not in required
    for overrides in ([], ["context=text_meanpool"]):
        model = build(make_cfg, *overrides)
        processor = SampleProcessor.for_model(model, 256)
        samples = [processor(raw_sample(f"s{i}", text)) for i, text in enumerate(["ab", "a longer one"])]
        pad = model.tokenizer.pad_id
        batches = [
            Collator(pad)(samples),
            PackingCollator(pad, 256)(samples),
            SourceCollator(Collator(pad), ["data"])(samples),
            GenerationCollator(pad, 4)([*samples, {"key": "bad", "error": "unreadable"}]),
        ]
        for batch in batches:
            assert set(batch) <= known, set(batch) - known
            assert required <= set(batch), required - set(batch)
        if overrides:
            assert "context_ids" in batches[0]
