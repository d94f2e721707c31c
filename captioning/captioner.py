"""The model-holding stages: ``Captioner`` (a VLM) and ``CaptionGuard`` (the training T5 tokenizer).

Both are callable classes: the model loads once in ``__init__`` (once per Ray actor), ``__call__`` maps a
batch to a batch. Neither knows about Ray; ``captioning.pipeline`` sets their resources.

Row formats. In: ``key``, ``pixels`` (raw RGB bytes), ``width``, ``height``, ``reason`` (from the reader).
Between generation and guards: ``key``, ``text`` (raw generation), ``reason``, ``seconds``.
Out: rows of the ``captions`` manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import tomllib
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image

from captioning.config import GenerationConfig, GuardConfig, ModelConfig
from captioning.guards import apply_guards
from captioning.reader import image_from_row
from manifests import CAPTIONS, Rejected
from manifests.checks import InputError, one_line
from manifests.schema import KEPT, REJECTED

log = logging.getLogger(__name__)

GENERATE_ERROR = "generate_error"
# Tokenizer classes of the T5 family (T5 v1.1 / Flan-T5 / mT5 / umT5): PixArt-Σ's text encoder is T5-XXL,
# so caption lengths and the 300-token budget are counted in these units.
T5_TOKENIZER_CLASSES = frozenset({"T5Tokenizer", "T5TokenizerFast", "MT5Tokenizer", "MT5TokenizerFast"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HASH_CHUNK = 8 << 20


def chat(prompt: str) -> list[dict]:
    """One user turn: the image, then the instruction (the order LLaVA, Qwen-VL and InternVL train with)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPU (the dtype these VLMs ship in), float32 on CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_processor(cfg: ModelConfig):
    """``AutoProcessor`` with left padding, so a batch's prompts end where generation starts."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    processor.tokenizer.padding_side = "left"
    return processor


def load_vlm(cfg: ModelConfig):
    """(processor, model) by hub id or local path, on GPU when there is one, in eval mode."""
    from transformers import AutoModelForImageTextToText

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    processor = load_processor(cfg)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.model, revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code
    )
    return processor, model.to(device).eval()


def processor_min_side(processor) -> int | None:
    """The short side the image processor resizes to (``shortest_edge``, or height/width), if it says."""
    image_processor = getattr(processor, "image_processor", processor)
    for attr in ("size", "crop_size"):
        size = getattr(image_processor, attr, None)
        if size is None:
            continue
        size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        if size.get("shortest_edge"):
            return int(size["shortest_edge"])
        if size.get("height") and size.get("width"):
            return int(min(size["height"], size["width"]))
    return None


def generate_captions(
    model, processor, images: list[Image.Image], prompts: list[str], gen_kwargs: dict
) -> list[str]:
    """Batched generation, one prompt per image; returns the stripped new text of each."""
    texts = [
        processor.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=False) for p in prompts
    ]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device, dtype=model.dtype)  # dtype applies to floating tensors (pixels) only
    with torch.inference_mode():
        output = model.generate(**inputs, **gen_kwargs)  # (B, prompt_len + new)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, new); left padding aligns every prompt end
    return [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def captioner_id(cfg: ModelConfig) -> str:
    """``<name>@<hash>``: for a local folder the hash of its config and weights (so a moved folder still
    resumes, a retrained one does not); for a hub id its resolved commit."""
    path = Path(cfg.model)
    if path.is_dir():
        if cfg.revision:
            log.warning("model.revision %r ignored: %s is a local folder", cfg.revision, path)
        files = sorted(
            p for p in path.iterdir() if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)
        )
        if not files:
            raise ValueError(f"model.model {cfg.model!r}: no config.json or weight files in this folder")
        return f"{path.resolve().name}@{_hash_files(files)}"
    from huggingface_hub import hf_hub_download

    # The snapshot folder is named after the commit the revision resolved to (works offline from cache).
    config_path = Path(hf_hub_download(cfg.model, "config.json", revision=cfg.revision))
    return f"{cfg.model}@{config_path.parent.name}"


def load_tokenizer(name: str):
    """The guards' tokenizer by hub id or local path, counting without truncation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.model_max_length = int(1e9)  # we count, we do not truncate: no length warning
    return tokenizer


def training_t5(config_path: str | os.PathLike) -> str:
    """The T5 a training TOML names (``[text] t5``); read as a file, so captioning imports no training code."""
    try:
        with open(config_path, "rb") as f:
            text = tomllib.load(f).get("text", {})
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"--training-config {str(config_path)!r} cannot be read: {one_line(err)}") from err
    if not isinstance(text, dict) or not isinstance(text.get("t5"), str) or not text["t5"]:
        raise InputError(f'--training-config {str(config_path)!r} names no T5: it has no [text] t5 = "…"')
    return text["t5"]


def _same_model(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def check_tokenizer(name: str, *, training_config: str | None = None) -> str:
    """Refuse a tokenizer whose token counts would not be in the training T5's units; returns its class.

    Accepted: a T5-family tokenizer, or exactly the one ``training_config`` names. A VLM's own tokenizer
    (Llama, Qwen, …) counts other tokens, so its ``num_tokens`` and the budget would mean nothing.
    """
    named = training_t5(training_config) if training_config else None
    if named is not None and not _same_model(named, name):
        raise InputError(
            f"--tokenizer {name!r} is not the T5 that --training-config {training_config!r} names ({named!r}): "
            "drop --tokenizer or pass that one"
        )
    try:
        kind = type(load_tokenizer(name)).__name__
    except (OSError, ValueError) as err:
        raise InputError(f"--tokenizer {name!r} cannot be loaded: {one_line(err)}") from err
    if named is None and kind not in T5_TOKENIZER_CLASSES:
        raise InputError(
            f"--tokenizer {name!r} loads as {kind}, not a T5 tokenizer: num_tokens and the token budget are "
            "counted in the training T5's units; pass the T5 the training config names "
            "(e.g. --tokenizer google/t5-v1_1-xxl, or --training-config configs/sigma.toml)"
        )
    return kind


class CaptionGuard:
    """Generated text → ``captions`` rows: guards, T5 token count and budget, status and reason."""

    def __init__(self, *, guards: GuardConfig, prompt: str, captioner: str, gen_params: dict) -> None:
        self.cfg = guards
        self.prompt = prompt
        self.captioner = captioner
        self.gen_params = json.dumps(gen_params, sort_keys=True)
        self.tokenizer = load_tokenizer(guards.tokenizer)

    def count_tokens(self, text: str) -> int:
        """T5 tokens including the closing ``</s>``, as the text encoder sees them."""
        return len(self.tokenizer(text).input_ids)

    def row(self, generated: dict) -> dict:
        base = {
            "key": generated["key"],
            "captioner": self.captioner,
            "prompt": self.prompt,
            "gen_params": self.gen_params,
            "seconds": generated.get("seconds"),
        }
        if generated.get("reason"):
            return {
                **base,
                "caption": generated.get("text"),
                "truncated": False,
                "status": REJECTED,
                "reason": generated["reason"],
            }
        result = apply_guards(
            generated["text"], prompt=self.prompt, cfg=self.cfg, count_tokens=self.count_tokens
        )
        return {
            **base,
            "caption": result.caption,
            "num_tokens": result.num_tokens,
            "truncated": result.truncated,
            "status": KEPT if result.reason is None else REJECTED,
            "reason": result.reason,
        }

    def rows(self, generated: list[dict]) -> pa.Table:
        return pa.Table.from_pylist([self.row(g) for g in generated], schema=CAPTIONS)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.rows(batch.to_pylist())


class Captioner:
    """Reader rows → ``captions`` rows with one VLM, batched ``generate`` with left padding."""

    def __init__(
        self,
        *,
        model: ModelConfig,
        prompt: str,
        generation: GenerationConfig,
        guards: GuardConfig,
        captioner: str,
    ) -> None:
        self.prompt = prompt
        self.gen_kwargs = generation.to_kwargs()
        self.processor, self.model = load_vlm(model)
        self.guard = CaptionGuard(
            guards=guards, prompt=prompt, captioner=captioner, gen_params=self.gen_kwargs
        )
        log.info("captioner %s loaded on %s (%s)", captioner, self.model.device, self.model.dtype)

    def generate(self, images: list[Image.Image]) -> list[str]:
        return generate_captions(
            self.model, self.processor, images, [self.prompt] * len(images), self.gen_kwargs
        )

    def caption(self, images: list[Image.Image]) -> list[tuple[str | Rejected, float]]:
        """(caption or Rejected, seconds) per image. A batch that raises is retried item by item, and an
        item that still raises gets the error as its reason (OOM is a ``RuntimeError``)."""
        if not images:
            return []
        started = time.perf_counter()
        try:
            texts = self.generate(images)
            seconds = (time.perf_counter() - started) / len(images)
            return [(t, seconds) for t in texts]
        except (RuntimeError, ValueError) as err:
            if len(images) == 1:
                return [(_generate_error(err), time.perf_counter() - started)]
            log.warning(
                "batch of %d failed (%s: %s); retrying one by one", len(images), type(err).__name__, err
            )
            _release_memory()
        results = []
        for image in images:
            started = time.perf_counter()
            try:
                results.append((self.generate([image])[0], time.perf_counter() - started))
            except (RuntimeError, ValueError) as err:
                _release_memory()
                results.append((_generate_error(err), time.perf_counter() - started))
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if not r["reason"]]  # rows the reader could decode
        results = dict(zip(todo, self.caption([image_from_row(rows[i]) for i in todo]), strict=True))
        generated = []
        for i, r in enumerate(rows):
            text, seconds = results.get(i, (None, None))
            reason = text.reason if isinstance(text, Rejected) else r["reason"]
            text = None if isinstance(text, Rejected) else text
            generated.append({"key": r["key"], "text": text, "reason": reason, "seconds": seconds})
        return self.guard.rows(generated)


def _generate_error(err: Exception) -> Rejected:
    return Rejected(f"{GENERATE_ERROR}: {type(err).__name__}: {str(err)[:200]}")


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
