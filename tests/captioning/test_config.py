"""Captioning config: presets, cross-field checks naming the field, and CLI flag overrides."""

from __future__ import annotations

import pytest

from captioning.cli import parse_args
from captioning.config import (
    PROMPTS,
    CaptioningConfig,
    GenerationConfig,
    GuardConfig,
    ModelConfig,
    PromptConfig,
    share_captioner_paper_generation,
)

REQUIRED = ["--input", "run", "--model", "m", "--tokenizer", "t5"]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ModelConfig(model="m", backend="onnx"), "model.backend"),
        (lambda: PromptConfig(preset="short"), "prompt.preset"),
        (lambda: PromptConfig(preset="custom"), "prompt.custom"),
        (lambda: PromptConfig(preset="detailed", custom="x"), "prompt.custom"),
        (lambda: GenerationConfig(num_beams=0), "generation.num_beams"),
        (lambda: GuardConfig(tokenizer="t5", token_budget=1), "guards.token_budget"),
    ],
)
def test_bad_values_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_defaults():
    cfg = CaptioningConfig(input="run", model=ModelConfig(model="m"), guards=GuardConfig(tokenizer="t5"))
    assert cfg.output == "run" and cfg.where == "status = 'kept'"
    assert cfg.prompt.text == PROMPTS["share-captioner"]
    assert cfg.generation.to_kwargs() == {
        "max_new_tokens": 500,
        "num_beams": 1,
        "repetition_penalty": 1.5,
        "do_sample": False,
    }
    assert cfg.guards.token_budget == 300 and cfg.guards.truncate_at_sentence
    assert share_captioner_paper_generation().num_beams == 3


def test_cli_flags_override_the_preset():
    cfg = parse_args(REQUIRED)
    assert cfg.model.model == "m" and cfg.guards.tokenizer == "t5" and cfg.resources.num_gpus == 0
    cfg = parse_args(
        REQUIRED + ["--prompt-preset", "detailed", "--max-new-tokens", "64", "--num-gpus", "1", "--batch-size", "32",
                    "--where", "tier = '4k'", "--no-truncate-at-sentence", "--output", "elsewhere"]
    )  # fmt: skip
    assert cfg.prompt.text == PROMPTS["detailed"] and cfg.generation.max_new_tokens == 64
    assert cfg.generation.repetition_penalty == 1.05  # the detailed preset's, not share-captioner's
    assert (cfg.resources.num_gpus, cfg.resources.batch_size) == (1, 32)
    assert cfg.where == "tier = '4k'" and not cfg.guards.truncate_at_sentence and cfg.output == "elsewhere"
    custom = parse_args(REQUIRED + ["--prompt", "Caption this.", "--preset", "debug"])
    assert custom.prompt.text == "Caption this." and custom.generation.max_new_tokens == 16
