"""``pixsigma-export``: any model source → a complete ``PixArtSigmaPipeline`` folder.

    python -m training.export --input RUN/final --output OUT [--components copy|reference]

The command line on top of the inference side, which points one way: formats (``training.convert``) ←
diffusers assembly (``training.pipeline``) ← loading any source (``training.sample``) ← this.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from manifests.progress import quiet_library_bars
from training.pipeline import FROZEN_COMPONENTS, export_pipeline
from training.sample import load_source


def export_cli(argv: list[str] | None = None) -> Path:
    """``python -m training.export`` / ``pixsigma-export``: export any model source as a PixArtSigmaPipeline."""
    parser = argparse.ArgumentParser(
        prog="pixsigma-export",
        description="Export a run, checkpoint, .pth, diffusers or pixsigma folder as a complete PixArtSigmaPipeline "
        "folder (KV-compressed models as PixArtKVTransformer2DModel).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="the model, as training.sample's --model takes it")
    parser.add_argument("--output", required=True, help="pipeline folder to write")
    parser.add_argument("--components", choices=("copy", "reference"), default="copy",
                        help="copy the T5/tokenizer/VAE into the folder, or name them in pixsigma.json")  # fmt: skip
    parser.add_argument("--standalone", action="store_true",
                        help="a folder plain diffusers loads with PixArtSigmaPipeline.from_pretrained(dir) alone "
                        "(trust_remote_code=True for KV models): components copied, the KV class's code inside")  # fmt: skip
    parser.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="for run folders and checkpoints"
    )
    parser.add_argument("--t5", help="T5 folder or hub id (default: the one the model was trained with)")
    parser.add_argument("--vae", help="VAE folder or hub id (default: the one the model was trained with)")
    parser.add_argument(
        "--vae-scaling-factor", type=float, help="default: recorded with the model, else the VAE's"
    )
    parser.add_argument("--preset", default="XL/2", help="model shape of an original .pth")
    parser.add_argument("--resolution", type=int, help="training resolution of an original .pth (px)")
    args = parser.parse_args(argv)
    quiet_library_bars()  # no \r bars (T5's "Loading weights", "Writing model shards") in a log file
    if args.standalone and args.components != "copy":
        parser.error("--standalone copies the T5, tokenizer and VAE: it cannot go with --components reference")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_source(
        args.input, weights=args.weights, preset=args.preset, resolution=args.resolution, t5=args.t5, vae=args.vae,
        vae_scaling_factor=args.vae_scaling_factor,
    )  # fmt: skip
    if loaded.components is None:
        parser.error(f"{args.input} does not record its T5 and VAE: pass --t5 and --vae")
    folder = export_pipeline(loaded.model, args.output, loaded.components, mode=args.components,
                             extra={"source": args.input, "standalone": args.standalone})  # fmt: skip
    index = json.loads((folder / "model_index.json").read_text())
    outside = [name for name in FROZEN_COMPONENTS if index.get(name, [None])[0] is None]
    if args.standalone and outside:
        raise ValueError(f"{folder}: {outside} not copied in; the export is not standalone")
    print(
        f"PixArtSigmaPipeline ({'KV-compressed' if loaded.model.config.kv_compress_layers else 'plain'}) → {folder}"
    )
    return folder


def main(argv: list[str] | None = None) -> None:
    """Console script ``pixsigma-export`` (returns None: a console script's return value is its exit status)."""
    export_cli(argv)


if __name__ == "__main__":
    main()
