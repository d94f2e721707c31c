"""Optional vLLM backend through Ray Data LLM (``pip install 'pixsigma[vllm]'``; needs CUDA).

``build_processor`` wraps ``ray.data.llm.build_processor`` with a ``vLLMEngineProcessorConfig``. Rows in
are the reader's rows (``key``, ``pixels``, ``width``, ``height``, ``reason``); rows out are the
generation rows the ``CaptionGuard`` stage expects (``key``, ``text``, ``reason``, ``seconds``), so both
backends share the guards. Config building and row formats are pure and tested without vLLM.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io

from captioning.captioner import GENERATE_ERROR
from captioning.config import CaptioningConfig, GenerationConfig
from captioning.reader import image_from_row

INSTALL_HINT = "pip install 'pixsigma[vllm]'"
MAX_MODEL_LEN = 4096  # image tokens (a few hundred to ~2.5 K for tiled VLMs) + prompt + 500 new tokens
_JPEG_QUALITY = 95  # the reduced image crosses to the engine as a data URL; near-lossless is enough


def require_vllm() -> None:
    """Raise a clear ``ImportError`` when the ``vllm`` extra is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            f"model.backend 'vllm' needs the vllm package, which is not installed: {INSTALL_HINT}"
        )


def sampling_params(gen: GenerationConfig) -> dict:
    """vLLM ``SamplingParams`` fields for our generation config (temperature 0 is greedy)."""
    if gen.num_beams > 1:
        raise ValueError("generation.num_beams > 1 is not supported by the vllm backend (use transformers)")
    params = {
        "max_tokens": gen.max_new_tokens,
        "repetition_penalty": gen.repetition_penalty,
        "temperature": gen.temperature if gen.do_sample else 0.0,
    }
    if gen.do_sample:
        params["top_p"] = gen.top_p
    return params


def processor_config_kwargs(cfg: CaptioningConfig) -> dict:
    """Keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig`` for this job."""
    engine_kwargs = {
        "dtype": "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype,
        "max_model_len": MAX_MODEL_LEN,
        "limit_mm_per_prompt": {"image": 1},
        "tensor_parallel_size": 1,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.model.revision:
        engine_kwargs["revision"] = cfg.model.revision
    return {
        "model_source": cfg.model.model,
        "batch_size": cfg.resources.batch_size,
        "concurrency": cfg.resources.num_actors,  # engine replicas, one GPU each (tensor_parallel_size 1)
        "engine_kwargs": engine_kwargs,
        "prepare_multimodal_stage": {"enabled": True},  # parses the image out of the chat messages
        "chat_template_stage": {"enabled": True},
        "tokenize_stage": {"enabled": True},
        "detokenize_stage": {"enabled": True},
        "should_continue_on_error": True,  # a failing row comes back with __inference_error__, not a crash
    }


def image_data_url(row: dict) -> str:
    buffer = io.BytesIO()
    image_from_row(row).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_row(row: dict, *, prompt: str, sampling: dict) -> dict:
    """Reader row → OpenAI-style chat request. A row the reader rejected still flows through (text only,
    one token) so it reaches the manifest with its reason, without a second pass over the data."""
    if row.get("reason"):
        content = [{"type": "text", "text": prompt}]
        sampling = {**sampling, "max_tokens": 1}
    else:
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(row)}},
            {"type": "text", "text": prompt},
        ]
    return {
        "key": row["key"],
        "reason": row.get("reason"),
        "messages": [{"role": "user", "content": content}],
        "sampling_params": sampling,
    }


def generated_row(row: dict) -> dict:
    """Engine output row → generation row (``key``, ``text``, ``reason``, ``seconds``)."""
    error = row.get("__inference_error__")
    reason = row.get("reason") or (f"{GENERATE_ERROR}: {error}" if error else None)
    seconds = row.get("time_taken_llm")
    return {
        "key": row["key"],
        "text": None if reason else row.get("generated_text"),
        "reason": reason,
        "seconds": float(seconds) if seconds is not None and seconds >= 0 else None,
    }


def build_processor(cfg: CaptioningConfig, *, prompt: str):
    """The Ray Data LLM processor (reader rows → generation rows); raises when vllm is missing."""
    require_vllm()
    from ray.data.llm import build_processor as build_llm_processor
    from ray.data.llm import vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(**processor_config_kwargs(cfg))
    return build_llm_processor(
        config,
        preprocess=functools.partial(request_row, prompt=prompt, sampling=sampling_params(cfg.generation)),
        postprocess=generated_row,
    )
