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
