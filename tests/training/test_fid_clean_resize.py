"""``--fid-resize clean`` against clean-fid itself (issue 19 §2): ``training.evaluate.clean_resize`` is clean-fid's
"clean" resize, compared with the ``clean-fid`` package's own resizer on images of varied sizes and modes.

clean-fid's "clean" mode (``cleanfid.resize.build_resizer("clean")`` = ``make_resizer("PIL", False, "bicubic",
(299, 299))``) resizes each channel of ``np.array(Image.open(f).convert("RGB"))`` as a float32 PIL image and
keeps the float result; ours hands torchmetrics uint8, so it rounds: equal to clean-fid's output rounded, and
never more than 0.5 apart. Only the resize is imported (clean-fid's FID functions download Inception weights).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from cleanfid.resize import build_resizer
from PIL import Image

from training.evaluate import clean_resize


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A textured image (gradients + noise, so bicubic overshoot and clipping happen) in ``mode``, via PNG."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx ^ yy) % 256], -1)
    noisy = (base + rng.normal(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
    noisy[height // 3 : height // 2] = 255  # hard edges: bicubic rings past [0, 255] there
    noisy[:, width // 4 : width // 3] = 0
    rgb = Image.fromarray(noisy, "RGB")
    image = {"RGB": rgb, "L": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "P": rgb.convert("P")}[mode]
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


CASES = [("RGB", (64, 48)), ("RGB", (640, 360)), ("L", (300, 299)), ("RGBA", (123, 517)), ("P", (299, 299)),
         ("RGB", (17, 1000)), ("P", (200, 150))]  # fmt: skip


@pytest.mark.parametrize(("mode", "size"), CASES)
def test_clean_resize_is_clean_fids_resize_rounded(mode, size):
    image = _image(mode, size, seed=len(CASES) + size[0])
    rgb = np.array(image.convert("RGB"))  # clean-fid's ResizeDataset reads images so
    theirs = build_resizer("clean")(rgb)  # (299, 299, 3) float32
    ours = clean_resize(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0]  # (3, 299, 299) uint8
    ours = ours.permute(1, 2, 0).numpy()
    assert theirs.shape == ours.shape == (299, 299, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, np.round(theirs).astype(np.uint8))
    assert np.abs(ours.astype(np.float64) - theirs).max() <= 0.5 + 1e-4
    if size != (299, 299):  # the images exercise what tells resizes apart (a bilinear resize is far off)
        assert np.abs(theirs - np.asarray(Image.fromarray(rgb).resize((299, 299), Image.BILINEAR))).max() > 2
