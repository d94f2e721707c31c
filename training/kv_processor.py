"""KV token compression inside diffusers: an attention processor and a PixArtTransformer2DModel that uses it.

diffusers' ``PixArtTransformer2DModel`` has no KV compression (PixArt-Σ §3.2, arXiv 2403.04692), so the
official 2K/4K KV models do not load there. Here the compression lives in an attention processor, as
diffusers intends for attention variants (``models/attention_processor.py``: processors own the math,
``Attention`` owns the projections; a processor that is an ``nn.Module`` owns weights, like
``IPAdapterAttnProcessor2_0``). ``KVCompressAttnProcessor`` computes q/k/v with the block's own
``to_q/to_k/to_v``, compresses K and V with a depthwise conv (kernel = stride = R) and an affine LayerNorm
shared by K and V, as the reference ``AttentionKVCompress`` (PixArt-sigma
``diffusion/model/nets/PixArt_blocks.py``, ``sampling='conv'``) does, and attends. A grid not divisible by
R is edge-padded first, exactly as ``training.model.Attention.compress`` (the reference floors instead and
drops the last row/column). Weights: ``transformer_blocks.{i}.attn1.processor.sr|norm.*``.

A processor only sees (B, N, D) tokens, and a non-square bucket cannot be reshaped from N alone, so the
model records the token grid from the latent that enters ``pos_embed`` (a forward pre-hook) before the
blocks run.

``PixArtKVTransformer2DModel`` is the loader: a ``PixArtTransformer2DModel`` whose config names the
compressed layers and the ratio, so ``save_pretrained``/``from_pretrained`` round-trip. This file imports
only torch and diffusers, so it travels: ``training.pipeline`` copies it into a KV export's ``transformer/``
and names it in ``model_index.json`` (a diffusers custom component), and plain diffusers loads the pipeline
with ``trust_remote_code=True``. Its config stores ``norm_type`` as ``KV_NORM_TYPE``
so that loading the folder as a plain ``PixArtTransformer2DModel`` (which would drop the compression
weights with only a warning and silently change every output) fails in the constructor instead, with
that value, naming this class, in the error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, PixArtTransformer2DModel  # noqa: F401  (ModelMixin: see below)
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

# diffusers resolves a custom pipeline component by looking up its base classes ("ModelMixin", …) by name
# in the component's module (pipelines/pipeline_loading_utils.py, load_sub_model); hence ModelMixin above.

PLAIN_NORM_TYPE = "ada_norm_single"
KV_NORM_TYPE = "ada_norm_single+kv_compress: load with training.kv_processor.PixArtKVTransformer2DModel"
PIXSIGMA_FORMAT = "pixsigma.PixArtSigma"  # training.convert.FORMAT_NAME (not imported: convert imports us)


class KVCompressAttnProcessor(nn.Module):
    """Self-attention with K and V reduced from N to ⌈h/R⌉·⌈w/R⌉ tokens (depthwise R×R conv + LayerNorm)."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        if ratio < 2:
            raise ValueError(f"KV compression ratio must be >= 2, got {ratio}")
        self.ratio = ratio
        self.sr = nn.Conv2d(dim, dim, kernel_size=ratio, stride=ratio, groups=dim)
        self.norm = nn.LayerNorm(dim)  # affine, eps 1e-5, as the reference's nn.LayerNorm(dim)
        with torch.no_grad():  # Conv Avg Init (PixArt-Σ §3.2): starts as R×R average pooling
            self.sr.weight.fill_(1.0 / ratio**2)
            self.sr.bias.zero_()
        self.grid_hw: tuple[int, int] | None = None  # set by TokenGridRecorder before every forward

    def compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """(B, h·w, D) → (B, ⌈h/R⌉·⌈w/R⌉, D), edge-padding a grid that R does not divide."""
        B, N, D = tokens.shape
        h, w = grid_hw
        if h * w != N:
            raise ValueError(f"token grid {h}x{w} does not match {N} tokens")
        grid = tokens.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w), row-major tokens
        pad_h, pad_w = -h % self.ratio, -w % self.ratio
        if pad_h or pad_w:
            grid = F.pad(grid, (0, pad_w, 0, pad_h), mode="replicate")  # (B, D, h', w')
        grid = self.sr(grid)  # (B, D, h'/R, w'/R)
        return self.norm(grid.flatten(2).transpose(1, 2))  # (B, M, D)

    def forward(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """diffusers' processor call: ``attn`` is the block's ``Attention`` (projections, heads)."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("KVCompressAttnProcessor is for PixArt's unmasked self-attention (attn1) only")
        if self.grid_hw is None:
            raise RuntimeError(
                "token grid unknown: the KV processor runs inside PixArtKVTransformer2DModel "
                "(or a transformer passed through enable_kv_compression)"
            )
        B, N, _ = hidden_states.shape  # (B, N, D)
        heads = attn.heads
        q = attn.to_q(hidden_states)  # (B, N, D)
        k = self.compress(attn.to_k(hidden_states), self.grid_hw)  # (B, M, D)
        v = self.compress(attn.to_v(hidden_states), self.grid_hw)  # (B, M, D)
        q = q.reshape(B, N, heads, -1).transpose(1, 2)  # (B, H, N, Dh)
        k = k.reshape(B, k.shape[1], heads, -1).transpose(1, 2)  # (B, H, M, Dh)
        v = v.reshape(B, v.shape[1], heads, -1).transpose(1, 2)  # (B, H, M, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(B, N, -1).to(q.dtype)  # (B, N, D)
        out = attn.to_out[0](out)  # (B, N, D)
        return attn.to_out[1](out)  # dropout (identity at inference)


class TokenGridRecorder:
    """Forward pre-hook on ``pos_embed``: tells each KV processor the (h, w) token grid of this forward.

    A callable object rather than a closure, so ``copy.deepcopy`` of the model copies it together with the
    processors it points to. It also checks that nobody replaced the processors (``set_attn_processor``,
    ``fuse_qkv_projections``), which would silently drop the compression.
    """

    def __init__(self, transformer: PixArtTransformer2DModel, layers: tuple[int, ...]) -> None:
        self.attentions = [transformer.transformer_blocks[i].attn1 for i in layers]
        self.processors = [a.processor for a in self.attentions]
        self.layers = layers
        self.patch_size = transformer.config.patch_size

    def __call__(self, module: nn.Module, args: tuple) -> None:
        latent = args[0]  # (B, C, H, W)
        grid = (latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size)
        for layer, attention, processor in zip(self.layers, self.attentions, self.processors, strict=True):
            if attention.processor is not processor:
                raise RuntimeError(
                    f"the KV-compression processor of layer {layer} was replaced by "
                    f"{type(attention.processor).__name__}; this model cannot run without it"
                )
            processor.grid_hw = grid


def enable_kv_compression(transformer: PixArtTransformer2DModel, layers, ratio: int) -> None:
    """Put ``KVCompressAttnProcessor`` (at Conv Avg Init) on ``attn1`` of ``layers`` and hook the grid."""
    layers = tuple(sorted(set(int(i) for i in layers)))
    num_layers = len(transformer.transformer_blocks)
    if not layers or any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"kv_compress_layers must be indices in [0, {num_layers}), got {list(layers)}")
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    reference = transformer.transformer_blocks[0].attn1.to_q.weight
    for i in layers:
        processor = KVCompressAttnProcessor(dim, ratio).to(device=reference.device, dtype=reference.dtype)
        transformer.transformer_blocks[i].attn1.set_processor(processor)
    transformer.pos_embed.register_forward_pre_hook(TokenGridRecorder(transformer, layers))


class PixArtKVTransformer2DModel(PixArtTransformer2DModel):
    """``PixArtTransformer2DModel`` + KV token compression in ``kv_compress_layers`` (ratio ``kv_compress_ratio``).

    Load with ``PixArtKVTransformer2DModel.from_pretrained(folder)``, or the whole pipeline with
    ``import training.kv_processor`` followed by ``PixArtSigmaPipeline.from_pretrained(folder)``.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = KV_NORM_TYPE,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
        kv_compress_layers: tuple[int, ...] | list[int] = (),
        kv_compress_ratio: int = 2,
    ) -> None:
        if norm_type not in (KV_NORM_TYPE, PLAIN_NORM_TYPE):
            raise ValueError(f"norm_type must be {KV_NORM_TYPE!r}, got {norm_type!r}")
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, dropout=dropout,
            norm_num_groups=norm_num_groups, cross_attention_dim=cross_attention_dim,
            attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
            activation_fn=activation_fn, num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention, norm_type=PLAIN_NORM_TYPE,
            norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
            interpolation_scale=interpolation_scale, use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels, attention_type=attention_type,
        )  # fmt: skip
        # The parent's own @register_to_config just wrote "ada_norm_single": put the marker back.
        self.register_to_config(
            norm_type=KV_NORM_TYPE,
            kv_compress_layers=sorted(kv_compress_layers),
            kv_compress_ratio=kv_compress_ratio,
        )
        enable_kv_compression(self, kv_compress_layers, kv_compress_ratio)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, refusing a pixsigma checkpoint folder with the loader to use."""
        refuse_pixsigma_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def refuse_pixsigma_folder(path, subfolder: str | None = None) -> None:
    """Raise for a folder written by ``training.convert.save_model``: diffusers cannot read it directly."""
    config = Path(path) / (subfolder or "") / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("format") == PIXSIGMA_FORMAT:
        raise ValueError(
            f"{config.parent} is a pixsigma checkpoint folder (config.json + model.safetensors), not a diffusers "
            "one: load it with training.convert.load_model, sample it with `python -m training.sample --model "
            f"{config.parent}`, or export a PixArtSigmaPipeline folder with `python -m training.export --input "
            f"{config.parent} --output OUT`"
        )
