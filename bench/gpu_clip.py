"""CLIP ViT-L/14 image-tower scoring throughput on one GPU, bf16 autocast, batch 256.

    python -m bench.gpu_clip [--batch-size 256] [--steps 20]

Random weights (``pretrained=None``): throughput does not depend on the values. Only torch and
open_clip; the input is a uint8 batch normalised on the device, as ``curation.aesthetic`` does, and the
collapsed LAION head (one matrix-vector product) is included. Goal: ≥ 1,500 img/s on an H100.
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14-quickgelu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_clip needs a CUDA device")
    model = open_clip.create_model(args.model, pretrained=None).visual.eval().requires_grad_(False).cuda()
    size = model.image_size[0] if isinstance(model.image_size, tuple) else model.image_size
    head = torch.nn.functional.normalize(torch.randn(model.output_dim, device="cuda"), dim=0)  # (D,)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device="cuda").view(1, 3, 1, 1)
    pixels = torch.randint(
        0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8
    ).pin_memory()  # (B, S, S, 3)

    def step() -> torch.Tensor:
        x = pixels.cuda(non_blocking=True).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            features = model((x - mean) / std)  # (B, D)
        return torch.nn.functional.normalize(features.float(), dim=-1) @ head  # (B,)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rate = args.batch_size * args.steps / seconds
    print(f"{args.model} bf16, batch {args.batch_size}, {torch.cuda.get_device_name()}: {rate:,.0f} img/s")


if __name__ == "__main__":
    main()
