"""Typed configuration of the captioning job. Presets are plain functions; CLI flags override fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

from manifests.checks import check_where

Backend = Literal["transformers", "vllm"]
PromptPreset = Literal["share-captioner", "detailed", "custom"]
DType = Literal["auto", "bfloat16", "float16", "float32"]

# PixArt-Σ §3.3: T5 max length raised from 120 (PixArt-α) to 300 tokens for the longer VLM captions.
T5_TOKEN_BUDGET = 300

PROMPTS: dict[str, str] = {
    # The instruction Share-Captioner was trained with (ShareGPT4V), the one PixArt-Σ's captions used.
    "share-captioner": "Analyze the image in a comprehensive and detailed manner.",
    # LLaVA / Qwen-VL style.
    "detailed": (
        "Describe this image in detail. Mention the main subjects and their attributes, their positions, "
        "the background, colors, lighting, style and any visible text."
    ),
}

REFUSAL_PHRASES = (
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i cannot",
    "i can't",
    "i can not",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "as an ai",
)


def _check_choice(name: str, value: object, literal: object) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass
class GenerationConfig:
    """Decoding settings. Greedy by default: one caption per (image, model, prompt), reproducible."""

    max_new_tokens: int = 500
    num_beams: int = 1
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0  # used only when do_sample
    top_p: float = 1.0  # used only when do_sample

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"generation.num_beams must be ≥ 1, got {self.num_beams}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"generation.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 when sampling, got {self.temperature}")

    def to_kwargs(self) -> dict:
        """Keyword arguments of ``model.generate`` (and the ``gen_params`` column)."""
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


def generation_for(preset: str) -> GenerationConfig:
    """Default decoding settings of a prompt preset (greedy; beams and sampling are opt-in)."""
    _check_choice("prompt.preset", preset, PromptPreset)
    if preset == "share-captioner":
        # Share-Captioner: repetition penalty 1.5, at most 500 new tokens; its beam search of 3 is
        # available as share_captioner_paper_generation().
        return GenerationConfig(max_new_tokens=500, repetition_penalty=1.5)
    # Qwen2-VL's shipped generation config uses a mild 1.05 penalty; the repetition guard catches loops.
    return GenerationConfig(max_new_tokens=400, repetition_penalty=1.05)


def share_captioner_paper_generation() -> GenerationConfig:
    """Exactly the decoding Share-Captioner reported: beam search 3, repetition penalty 1.5, 500 tokens."""
    return GenerationConfig(max_new_tokens=500, num_beams=3, repetition_penalty=1.5)


@dataclass
class ModelConfig:
    model: str  # HF hub id or local path (anything AutoModelForImageTextToText loads)
    revision: str | None = None  # hub revision; ignored for a local path
    backend: Backend = "transformers"
    dtype: DType = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model.model must name a hub id or a local path")
        _check_choice("model.backend", self.backend, Backend)
        _check_choice("model.dtype", self.dtype, DType)


@dataclass
class PromptConfig:
    preset: PromptPreset = "share-captioner"
    custom: str | None = None  # the prompt text when preset == "custom"

    def __post_init__(self) -> None:
        _check_choice("prompt.preset", self.preset, PromptPreset)
        if self.preset == "custom" and not (self.custom and self.custom.strip()):
            raise ValueError("prompt.custom must be a non-empty prompt when prompt.preset is 'custom'")
        if self.preset != "custom" and self.custom is not None:
            raise ValueError(
                f"prompt.custom is only used with prompt.preset 'custom', got preset {self.preset!r}"
            )

    @property
    def text(self) -> str:
        return self.custom.strip() if self.preset == "custom" else PROMPTS[self.preset]


@dataclass
class GuardConfig:
    tokenizer: str  # the training config's T5 tokenizer (path or hub id): num_tokens and the budget
    token_budget: int = T5_TOKEN_BUDGET  # T5 tokens including the closing </s>
    truncate_at_sentence: bool = True  # over budget: cut at the last sentence end that fits (else only flag)
    refusal_phrases: tuple[str, ...] = REFUSAL_PHRASES
    repetition_max_period: int = 16  # longest looping n-gram (in words) checked
    repetition_min_repeats: int = 4  # consecutive copies of one n-gram that make a loop
    min_distinct_trigram_ratio: float = 0.5  # below this, a long caption is degenerate
    distinct_min_words: int = 40  # the ratio is judged only on captions at least this long

    def __post_init__(self) -> None:
        if self.token_budget < 2:
            raise ValueError(f"guards.token_budget must be ≥ 2, got {self.token_budget}")
        if self.repetition_min_repeats < 2:
            raise ValueError(f"guards.repetition_min_repeats must be ≥ 2, got {self.repetition_min_repeats}")
        if not 0 <= self.min_distinct_trigram_ratio <= 1:
            raise ValueError(
                f"guards.min_distinct_trigram_ratio must be in [0, 1], got {self.min_distinct_trigram_ratio}"
            )
        self.refusal_phrases = tuple(p.lower() for p in self.refusal_phrases)


@dataclass
class ResourceConfig:
    """Where the Ray pipeline is wired: batch and pool sizes, accelerators per actor."""

    batch_size: int = 8  # images per generate call
    num_actors: int = 1  # captioner actor pool size (one model replica each)
    num_gpus: float = 0.0  # per captioner actor; 1 on a GPU cluster
    num_cpus: float = 1.0  # per captioner actor
    read_chunk_size: int = 64  # images per read task (a task reads one shard's members)
    rows_per_part: int = 1000  # captions per committed manifest part (the unit a killed run loses)

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_actors", "read_chunk_size", "rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"resources.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("resources.num_gpus and resources.num_cpus must be ≥ 0")


@dataclass
class CaptioningConfig:
    input: str  # a curation run folder (manifests/images + shards/curated)
    model: ModelConfig
    guards: GuardConfig
    output: str | None = None  # run folder for manifests/captions; defaults to input
    where: str = "status = 'kept'"  # DuckDB WHERE over the `images` view (one boolean expression)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig | None = None  # None: the prompt preset's defaults
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    decode_min_side: int | None = None  # reduced decode target; None: the processor's input size
    # Rows rejected for a reason outside the image (its shard was missing or unreadable, generate ran out of
    # memory) are captioned again on a rerun; False keeps their rejected rows as they are.
    retry_failed: bool = True
    training_config: str | None = (
        None  # a training TOML: its [text] t5 is the tokenizer guards must count with
    )

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = self.input
        self.where = check_where(self.where, view="images", flag="--where")
        if self.generation is None:
            self.generation = generation_for(self.prompt.preset)
        if self.decode_min_side is not None and self.decode_min_side < 1:
            raise ValueError(f"decode_min_side must be ≥ 1, got {self.decode_min_side}")
        if self.model.backend == "vllm" and self.generation.num_beams > 1:
            raise ValueError("generation.num_beams > 1 is not supported with model.backend 'vllm'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def debug_config(input: str, *, model: str, tokenizer: str, output: str | None = None) -> CaptioningConfig:
    """The `debug` preset: tiny model, short greedy captions, small batches, CPU."""
    return CaptioningConfig(
        input=input,
        output=output,
        model=ModelConfig(model=model),
        guards=GuardConfig(tokenizer=tokenizer),
        generation=GenerationConfig(max_new_tokens=16),
        resources=ResourceConfig(batch_size=4, read_chunk_size=8, rows_per_part=8),
    )
