"""An offline stand-in for FID's Inception-v3 weights: torch-fidelity's architecture with random weights.

The file has the layout of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the TF FID
Inception converted to PyTorch), so ``training.evaluate`` loads it through the same path as the real
weights. Random weights shrink activations to nothing after ~20 convolutions, so the batch-norm running
statistics are calibrated on synthetic pictures (one train-mode pass): the pool features then vary with the
image, and FID between different sets is non-zero. Its values mean nothing; the code path is the real one.

    python -m training.tiny_inception --output DIR    # writes DIR/inception/pt_inception-random.pth
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

INCEPTION_DIR = "inception"
RANDOM_WEIGHTS_NAME = "pt_inception-random.pth"
INPUT_SIZE = 299  # FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE


class _InceptionLayout(nn.Module):
    """The modules of torch-fidelity's ``FeatureExtractorInceptionV3``, by name, with a plain forward."""

    def __init__(self) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import (
            BasicConv2d,
            InceptionA,
            InceptionB,
            InceptionC,
            InceptionD,
            InceptionE_1,
            InceptionE_2,
        )

        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(
            self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2
        )  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # … → (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)


@torch.no_grad()
def build_tiny_inception(out_dir: Path, *, seed: int = 0) -> Path:
    """Save random Inception-v3 weights with calibrated batch norms to ``out_dir/inception``; returns the file."""
    from training.tiny import synthetic_image

    path = Path(out_dir) / INCEPTION_DIR / RANDOM_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _InceptionLayout()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
    images = [synthetic_image(i, (INPUT_SIZE, INPUT_SIZE)) for i in range(4)]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1) for im in images])
    model.train()((pixels - 128) / 128)  # the extractor's own input scaling
    state = {
        k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    torch.save(state, path)
    log.info("random Inception-v3 (FID layout) saved to %s", path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="models folder; the file goes to inception/"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"inception: {build_tiny_inception(args.output)}")


if __name__ == "__main__":
    main()
