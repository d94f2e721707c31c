"""The optional vLLM backend without vLLM: config building, row formats, and the missing-extra error."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from ray.data.llm import vLLMEngineProcessorConfig

from captioning import vllm_engine
from captioning.config import CaptioningConfig, GenerationConfig, GuardConfig, ModelConfig, ResourceConfig
from captioning.reader import pixels_row

PROMPT = "Analyze the image in a comprehensive and detailed manner."


def vllm_config(**generation) -> CaptioningConfig:
    return CaptioningConfig(
        input="run",
        model=ModelConfig(model="org/some-vlm", revision="abc123", backend="vllm"),
        guards=GuardConfig(tokenizer="t5"),
        generation=GenerationConfig(**generation),
        resources=ResourceConfig(batch_size=16, num_actors=2),
    )


def test_processor_config_is_accepted_by_ray():
    kwargs = vllm_engine.processor_config_kwargs(vllm_config())
    assert kwargs["model_source"] == "org/some-vlm"
    assert (kwargs["batch_size"], kwargs["concurrency"]) == (16, 2)
    assert kwargs["engine_kwargs"]["dtype"] == "bfloat16" and kwargs["engine_kwargs"]["revision"] == "abc123"
    assert kwargs["engine_kwargs"]["limit_mm_per_prompt"] == {"image": 1}
    config = vLLMEngineProcessorConfig(**kwargs)  # constructing it needs no vllm
    assert config.model_source == "org/some-vlm" and config.should_continue_on_error


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ({}, {"max_tokens": 500, "repetition_penalty": 1.0, "temperature": 0.0}),
        ({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64},
         {"max_tokens": 64, "repetition_penalty": 1.0, "temperature": 0.7, "top_p": 0.9}),
    ],
)  # fmt: skip
def test_sampling_params(generation, expected):
    assert vllm_engine.sampling_params(GenerationConfig(**generation)) == expected


def test_beam_search_is_refused_with_vllm():
    with pytest.raises(ValueError, match="num_beams"):
        vllm_config(num_beams=3)


def test_request_row_carries_the_image_as_a_data_url():
    row = pixels_row("k00", Image.new("RGB", (12, 8), (200, 10, 10)))
    request = vllm_engine.request_row(row, prompt=PROMPT, sampling={"max_tokens": 500, "temperature": 0.0})
    assert request["key"] == "k00" and request["reason"] is None
    image_part, text_part = request["messages"][0]["content"]
    assert text_part == {"type": "text", "text": PROMPT}
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (12, 8)
    assert request["sampling_params"] == {"max_tokens": 500, "temperature": 0.0}


def test_request_row_of_an_unreadable_image_is_text_only_and_one_token():
    row = {"key": "k05", "pixels": None, "width": None, "height": None, "reason": "decode_error: x"}
    request = vllm_engine.request_row(row, prompt=PROMPT, sampling={"max_tokens": 500})
    assert request["messages"][0]["content"] == [{"type": "text", "text": PROMPT}]
    assert request["sampling_params"]["max_tokens"] == 1 and request["reason"] == "decode_error: x"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"key": "a", "reason": None, "generated_text": "A dog.", "time_taken_llm": 0.5, "__inference_error__": ""},
         {"key": "a", "text": "A dog.", "reason": None, "seconds": 0.5}),
        ({"key": "b", "reason": None, "generated_text": "", "time_taken_llm": -1, "__inference_error__": "OOM"},
         {"key": "b", "text": None, "reason": "generate_error: OOM", "seconds": None}),
        ({"key": "c", "reason": "missing_in_shard", "generated_text": "x", "time_taken_llm": 0.1},
         {"key": "c", "text": None, "reason": "missing_in_shard", "seconds": 0.1}),
    ],
)  # fmt: skip
def test_generated_row(row, expected):
    assert vllm_engine.generated_row(row) == expected


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pixsigma\[vllm\]"):
        vllm_engine.build_processor(vllm_config(), prompt=PROMPT)
