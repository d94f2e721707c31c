"""The toy T5 (``training.tiny.build_toy_t5``): one token per word of a toy caption, loaded like real T5.

Reference for the token count: the caption's own words and commas (a plain regex), plus T5's </s>.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from manifests.features import T5Features
from manifests.toy import caption, scene_for
from training.tiny import TOY_MAX_TOKENS, build_toy_t5

NUM_CAPTIONS = 500


@pytest.fixture(scope="module")
def toy_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_t5(tmp_path_factory.mktemp("models"))


def test_a_toy_caption_is_one_token_per_word_and_round_trips(toy_t5: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(toy_t5))  # the call real T5-XXL's tokenizer loads through
    captions = [caption(scene_for(7, i)) for i in range(NUM_CAPTIONS)]
    lengths = []
    for text in captions:
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids, text
        assert len(ids) == len(re.findall(r"[a-z]+|,", text)) + 1, tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        lengths.append(len(ids))
    assert max(lengths) <= TOY_MAX_TOKENS, max(lengths)
    assert np.mean(lengths) <= 24, np.mean(lengths)  # the brief: ≤ ~24 tokens a caption
    # Other text still tokenises (by character pieces), never to <unk> alone.
    other = tokenizer("A photo of a cat!").input_ids
    assert tokenizer.decode(other, skip_special_tokens=True).replace(" ", "") == "Aphotoofacat!"


def test_toy_captions_get_distinct_states_through_the_feature_path(toy_t5: Path) -> None:
    """Through ``T5Features`` (the materialize and trainer path): a caption's valid states are its own."""
    features = T5Features(str(toy_t5), max_tokens=TOY_MAX_TOKENS, device=torch.device("cpu"))
    a = "a red circle at the top left, on a plain white background"
    b = "a blue circle at the top left, on a plain white background"
    states = features([a, b, a])  # valid tokens only: (L, 32) each, L = 13 words and commas + </s>
    assert states[0].shape == (14, 32) and states[1].shape == (14, 32)
    np.testing.assert_array_equal(states[0], states[2])
    assert np.abs(states[0] - states[1]).max() > 1e-2
