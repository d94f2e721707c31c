"""Command line of the captioning job (``captioning/run.py`` and ``python -m captioning.cli`` call ``main``).

    python captioning/run.py --input OUT --model PATH_OR_ID --tokenizer T5PATH \
        [--where SQL] [--prompt-preset share-captioner|detailed | --prompt TEXT] [--output OUT] …

Flags left out keep the preset's value (``--preset default|debug``); under ``default`` the prompt preset
sets the decoding (greedy), under ``debug`` captions stay short. ``--training-config`` may stand in for
``--tokenizer``: the T5 its ``[text] t5`` names. A bad flag is one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import get_args

from captioning.captioner import training_t5
from captioning.config import (
    Backend,
    CaptioningConfig,
    DType,
    GuardConfig,
    ModelConfig,
    PromptConfig,
    PromptPreset,
    debug_config,
    generation_for,
)
from captioning.pipeline import run
from manifests import preflight
from manifests.checks import InputError, cli
from manifests.progress import quiet_library_bars

PRESETS = ("default", "debug")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Caption curated images with a VLM into the captions manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input", required=True, help="curation run folder (manifests/images, shards/curated)"
    )
    parser.add_argument("--output", help="run folder for manifests/captions (default: --input)")
    parser.add_argument(
        "--model", required=True, help="VLM hub id or local path (AutoModelForImageTextToText)"
    )
    parser.add_argument("--revision", help="hub revision of --model")
    parser.add_argument(
        "--tokenizer",
        help="the training T5's tokenizer (num_tokens and the budget are in its units); "
        "default: the one --training-config names",
    )
    parser.add_argument(
        "--training-config",
        help="training TOML whose [text] t5 is the tokenizer (checked against --tokenizer)",
    )
    parser.add_argument("--where", help="DuckDB WHERE over the images view (default: status = 'kept')")
    parser.add_argument(
        "--retry-failed", action=argparse.BooleanOptionalAction, default=True,
        help="caption again rows an earlier run rejected for shard_error, missing_in_shard or generate_error; "
        "--no-retry-failed keeps them",
    )  # fmt: skip
    parser.add_argument(
        "--preset", choices=PRESETS, default="default", help="config preset the flags override"
    )
    parser.add_argument("--backend", choices=get_args(Backend))
    parser.add_argument("--dtype", choices=get_args(DType))
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-preset", choices=[p for p in get_args(PromptPreset) if p != "custom"])
    prompt.add_argument("--prompt", help="a custom prompt (prompt preset 'custom')")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int, help="captioner actors (model replicas)")
    parser.add_argument("--num-gpus", type=float, help="GPUs per captioner actor")
    parser.add_argument("--rows-per-part", type=int)
    parser.add_argument("--token-budget", type=int)
    parser.add_argument(
        "--truncate-at-sentence", action=argparse.BooleanOptionalAction, default=None,
        help="cut captions over the budget at a sentence end (default: yes); --no-… only flags them",
    )  # fmt: skip
    parser.add_argument(
        "--decode-min-side", type=int, help="reduced decode target (default: the processor's size)"
    )
    return parser


def _override(obj, **values):
    """``dataclasses.replace`` with the values that were given (None means: keep the preset's)."""
    return dataclasses.replace(obj, **{k: v for k, v in values.items() if v is not None})


def parse_args(argv: list[str] | None = None) -> CaptioningConfig:
    """The resolved config: preset, then flags."""
    args = build_parser().parse_args(argv)
    tokenizer = args.tokenizer
    if tokenizer is None:
        if args.training_config is None:
            raise InputError("--tokenizer is required (the training T5's tokenizer), or --training-config")
        tokenizer = training_t5(args.training_config)
    if args.preset == "debug":
        cfg = debug_config(args.input, model=args.model, tokenizer=tokenizer, output=args.output)
    else:
        cfg = CaptioningConfig(
            input=args.input,
            output=args.output,
            model=ModelConfig(model=args.model),
            guards=GuardConfig(tokenizer=tokenizer),
        )
    prompt = cfg.prompt
    if args.prompt is not None:
        prompt = PromptConfig(preset="custom", custom=args.prompt)
    elif args.prompt_preset is not None:
        prompt = PromptConfig(preset=args.prompt_preset)
    # The default preset decodes as its prompt preset says; debug keeps its short captions.
    generation = generation_for(prompt.preset) if args.preset == "default" else cfg.generation
    return dataclasses.replace(
        cfg,
        where=args.where if args.where is not None else cfg.where,
        prompt=prompt,
        model=_override(cfg.model, revision=args.revision, backend=args.backend, dtype=args.dtype),
        generation=_override(
            generation,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            repetition_penalty=args.repetition_penalty,
        ),
        resources=_override(
            cfg.resources,
            batch_size=args.batch_size,
            num_actors=args.num_workers,
            num_gpus=args.num_gpus,
            rows_per_part=args.rows_per_part,
        ),  # fmt: skip
        guards=_override(
            cfg.guards, token_budget=args.token_budget, truncate_at_sentence=args.truncate_at_sentence
        ),
        decode_min_side=args.decode_min_side if args.decode_min_side is not None else cfg.decode_min_side,
        retry_failed=args.retry_failed,
        training_config=args.training_config,
    )


@cli
def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the job, print the summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_bars()  # no \r bars (processor and tokenizer loads) in a log file
    cfg = parse_args(argv)
    # Before Ray starts an actor: the run folder, the output and the models (issue 11, preflight).
    preflight.check_run_folder("--input", cfg.input)
    preflight.check_output("--output", cfg.output)
    preflight.check_model("--model", cfg.model.model, revision=cfg.model.revision)
    preflight.check_model("--tokenizer", cfg.guards.tokenizer)
    summary = run(cfg)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
