"""Aesthetic score: open_clip image tower + LAION aesthetic predictor v2 head, as a Ray actor stage.

The head (``sac+logos+ava1-l14-linearMSE.pth``, shipped as ``curation/assets/laion_aesthetic_v2.safetensors``)
is five Linear layers with dropout between them and no activation, so in eval mode it is one affine map: score = w · e + b over the L2-normalised 768-d image
embedding e. ``load_aesthetic_head`` multiplies the layers out once at load time (in float64, then
float32), and scoring a batch costs one matrix-vector product instead of five matmuls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.config import BUILTIN_HEAD, AestheticConfig

CLIP_INPUT = "clip_input"  # batch column: (S, S, 3) uint8 thumbnail bytes from pass 2, null when rejected
EMBEDDING = "embedding"  # batch column when embeddings are kept: fp16 L2-normalised image embedding
HEAD_LAYERS = (0, 2, 4, 6, 7)  # Linear layers of the head's nn.Sequential; 1, 3, 5 are Dropout
# The published head converted to safetensors, bit for bit (curation/assets/PROVENANCE.md).
BUILTIN_HEAD_FILE = "laion_aesthetic_v2.safetensors"


@dataclass(frozen=True)
class AestheticHead:
    """The head collapsed to one affine map: ``score = embedding @ weight + bias``."""

    weight: np.ndarray  # (D,) float32
    bias: float
    model_id: str  # file name + sha256 prefix, stored in the manifest's ``aesthetic_model``


def resolve_head(spec: str | Path) -> Path:
    """The head's file: ``builtin`` is the copy shipped inside this package, anything else a local path."""
    if str(spec) == BUILTIN_HEAD:
        return Path(str(resources.files("curation") / "assets" / BUILTIN_HEAD_FILE))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"aesthetic head not found: {path} (--aesthetic-head takes 'builtin' or a .safetensors/.pth file)"
        )
    return path


def load_head_state(path: Path) -> dict:
    """The head's tensors from safetensors, or from a ``.pth`` state dict with ``weights_only`` (no pickle code)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_aesthetic_head(spec: str | Path = BUILTIN_HEAD) -> AestheticHead:
    """Load the LAION head (``builtin`` or a path) and collapse its Linear layers into one."""
    path = resolve_head(spec)
    state = load_head_state(path)
    expected = {f"layers.{i}.{p}" for i in HEAD_LAYERS for p in ("weight", "bias")}
    if set(state) != expected:
        raise ValueError(f"{path}: expected keys {sorted(expected)}, got {sorted(state)}")
    # y = W_k(…(W_0 x + b_0)…) + b_k, folded left to right: A ← W_i A, c ← W_i c + b_i.
    matrix = state["layers.0.weight"].double()  # (1024, D)
    offset = state["layers.0.bias"].double()  # (1024,)
    for i in HEAD_LAYERS[1:]:
        weight, bias = state[f"layers.{i}.weight"].double(), state[f"layers.{i}.bias"].double()
        matrix, offset = weight @ matrix, weight @ offset + bias
    assert matrix.shape[0] == 1, "the head ends in a single output"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return AestheticHead(
        weight=matrix[0].float().numpy(), bias=float(offset[0]), model_id=f"{path.name}@sha256:{digest}"
    )


def clip_model_id(cfg: AestheticConfig) -> str:
    """The ``clip_model`` manifest value: model name, plus the pretrained tag or checkpoint for built-ins."""
    if cfg.clip_model.startswith(("local-dir:", "hf-hub:")) or not cfg.pretrained:
        return cfg.clip_model
    return f"{cfg.clip_model}/{cfg.pretrained}"


def clip_image_size(model_name: str) -> int:
    """The image tower's input side, read from the model config alone (no weights loaded on the driver; a
    ``local-dir:`` model's JSON is read without importing open_clip, whose torch/transformers/timm imports take
    ~6 s of a one-core start-up: issue 18, item 8)."""
    if model_name.startswith("local-dir:"):
        config_path = Path(model_name.removeprefix("local-dir:")) / "open_clip_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: not an open_clip local-dir model")
        model_cfg = json.loads(config_path.read_text())["model_cfg"]
    elif model_name.startswith("hf-hub:"):
        raise ValueError(
            "aesthetic.clip_model: hf-hub: names need a download; use local-dir: or a built-in name"
        )
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"aesthetic.clip_model: unknown open_clip model {model_name!r}")
    size = model_cfg["vision_cfg"]["image_size"]
    if not isinstance(size, int):
        raise ValueError(f"aesthetic.clip_model: only square image towers are supported, got {size}")
    return size


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``num_threads`` inside the block, restored after. The local executor's
    scorer uses its actor's ``num_cpus`` as a Ray actor does (Ray sets ``OMP_NUM_THREADS`` from it): the same
    thread count as on Ray, and no oversubscription of cores the scan processes use."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class AestheticScorer:
    """Callable class for ``map_batches``: the model and head load once per actor, ``__call__`` scores.

    Input batches carry the manifest columns plus ``clip_input`` (pass 2's thumbnail, null for rows
    rejected earlier); output batches carry the manifest columns with ``aesthetic``, ``aesthetic_model``
    and ``clip_model`` filled for scored rows, plus ``embedding`` when ``save_embeddings`` is on.
    """

    def __init__(self, cfg: AestheticConfig) -> None:
        import open_clip
        import torch

        self.cfg = cfg
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if cfg.num_gpus > 0 and self.device == "cpu":
            raise RuntimeError("aesthetic.num_gpus > 0 but this actor sees no CUDA device")
        pretrained = None if cfg.clip_model.startswith(("local-dir:", "hf-hub:")) else cfg.pretrained
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.clip_model, pretrained=pretrained)
        self.model = model.visual.eval().requires_grad_(False).to(self.device)  # image tower only
        normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
        self.mean = torch.tensor(normalize.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(normalize.std, device=self.device).view(1, 3, 1, 1)
        self.image_size = clip_image_size(cfg.clip_model)
        head = load_aesthetic_head(cfg.head)
        self.head = head
        self.aesthetic_model = head.model_id
        self.clip_model = clip_model_id(cfg)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings of ``(B, S, S, 3)`` uint8 thumbnails, float32 ``(B, D)``."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
            x = (x - self.mean) / self.std
            # bf16 autocast on GPU: ViT-L/14 at batch 256 is matmul-bound; the head stays fp32.
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                features = self.model(x)  # (B, D)
            features = torch.nn.functional.normalize(features.float(), dim=-1)  # (B, D)
        return features.cpu().numpy()

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Collapsed head: one matrix-vector product, ``(B, D) → (B,)``."""
        return embeddings @ self.head.weight + np.float32(self.head.bias)

    def __call__(self, batch: pa.Table) -> pa.Table:
        thumbnails = batch.column(CLIP_INPUT).to_pylist()
        rows = [i for i, t in enumerate(thumbnails) if t is not None]
        size = self.image_size
        scores: list[float | None] = [None] * batch.num_rows
        embeddings: list[np.ndarray | None] = [None] * batch.num_rows
        if rows:
            pixels = np.stack([np.frombuffer(thumbnails[i], np.uint8).reshape(size, size, 3) for i in rows])
            batch_embeddings = self.embed(pixels)  # (B, D)
            for i, emb, s in zip(rows, batch_embeddings, self.score(batch_embeddings), strict=True):
                scores[i], embeddings[i] = float(s), emb
        scored = [s is not None for s in scores]
        out = batch.drop_columns([CLIP_INPUT])
        for name, values, kind in (
            ("aesthetic", scores, pa.float32()),
            ("aesthetic_model", [self.aesthetic_model if f else None for f in scored], pa.string()),
            ("clip_model", [self.clip_model if f else None for f in scored], pa.string()),
        ):
            out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, kind))
        if self.cfg.save_embeddings:
            values = [e.astype(np.float16) if e is not None else None for e in embeddings]
            out = out.append_column(EMBEDDING, pa.array(values, pa.list_(pa.float16())))
        return out
