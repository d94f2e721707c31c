"""Tiny offline stand-ins for the training side's frozen models: a T5 text encoder and AutoencoderKLs.

They are saved with ``save_pretrained`` and load through the same calls as the real weights:

    tokenizer = AutoTokenizer.from_pretrained(out / "t5")       # T5Tokenizer (fast, sentencepiece vocab)
    text_encoder = T5EncoderModel.from_pretrained(out / "t5")
    vae = AutoencoderKL.from_pretrained(out / "vae")              # latent = image / 8, 4 channels

Nothing is downloaded: the sentencepiece vocabulary is trained in memory on captions generated here.
Two VAEs that differ in weights and ``scaling_factor`` (SD-like 0.18215, SDXL-like 0.13025) stand in
for PixArt-Σ's weak-to-strong VAE swap (the paper moves from the SD VAE to the SDXL VAE).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import string
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from manifests.progress import quiet_library_bars
from manifests.toy import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, caption, render, scene_for
from training.config import SD_VAE_SCALING, SDXL_VAE_SCALING  # named once, in the trainer config

logger = logging.getLogger(__name__)

SD_VAE_SCALING_FACTOR = SD_VAE_SCALING
SDXL_VAE_SCALING_FACTOR = SDXL_VAE_SCALING
VAE_DOWNSAMPLE = 8  # 4 encoder blocks, the last without downsampling: 2**3, as in SD / SDXL
SPM_VOCAB_SIZE = 600  # a soft limit: the trainer stops earlier if the corpus runs out of pieces
T5_DIR = "t5"
TOY_T5_DIR = "toy_t5"
TOY_MAX_TOKENS = 36  # the longest toy caption (3 objects, a gradient) is 34 toy-T5 tokens with </s>

_SUBJECTS = (
    "cat",
    "dog",
    "astronaut",
    "rocket",
    "cup of coffee",
    "red car",
    "lighthouse",
    "mountain lake",
    "city street",
    "bowl of fruit",
    "old clock",
    "sailing boat",
    "forest path",
    "robot",
    "violin",
    "galaxy",
    "portrait of a woman",
    "bicycle",
    "castle",
    "field of sunflowers",
)
_SETTINGS = (
    "at sunset",
    "in the rain",
    "on a wooden table",
    "under a starry sky",
    "in a snowy forest",
    "on a white background",
    "by the sea",
    "in a busy market",
    "at dawn",
    "in soft studio light",
    "seen from above",
    "in a misty valley",
)
_STYLES = (
    "a photo of",
    "an oil painting of",
    "a watercolour of",
    "a pencil sketch of",
    "a 3D render of",
    "a close-up photograph of",
    "a minimalist poster of",
    "a vintage postcard of",
)
_DETAILS = (
    "highly detailed",
    "shallow depth of field",
    "vivid colours",
    "black and white",
    "4k",
    "wide angle",
    "soft shadows",
    "dramatic lighting",
    "pastel tones",
    "film grain",
)


# Capitals, digits and punctuation, so real captions (and the demo corpus's) rarely hit <unk>.
_EXTRA = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    "Punctuation: commas, full stops; colons! questions? 'quotes' \"double\" (brackets) a-b a/b 50% & #1.",
    'A diagonal gradient from navy to orange with two yellow circles, and the word "DELTA" in white letters.',
    "Portrait of NASA astronaut Eileen Collins in an orange flight suit in front of an American flag.",
    "A SpaceX Falcon 9 rocket lifting off from Cape Canaveral in 2015, photographed at 1/1000 s.",
    "The Hubble eXtreme Deep Field: hundreds of distant galaxies on black space.",
    "Black and white photograph of a person standing behind a camera on a tripod.",
    "A smooth grey ramp from dark on the left to light on the right with a bright white disc.",
)


def caption_corpus(num_sentences: int = 480) -> list[str]:
    """Caption-like sentences, deterministic: style × subject × setting, cycling details, plus extras."""
    combos = itertools.product(_STYLES, _SUBJECTS, _SETTINGS)
    details = itertools.cycle(_DETAILS)
    sentences = list(_EXTRA)
    for (style, subject, setting), detail in zip(itertools.islice(combos, 0, None, 4), details, strict=False):
        sentences.append(f"{style} {subject} {setting}, {detail}.")
        if len(sentences) == num_sentences:
            break
    return sentences


def train_sentencepiece(sentences: list[str], *, vocab_size: int = SPM_VOCAB_SIZE) -> bytes:
    """Train a T5-layout unigram model (pad 0, eos 1, unk 2, no bos) in memory; return its bytes."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,  # one thread: the same corpus always gives the same model
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def build_tiny_t5(out_dir: Path, *, seed: int = 0) -> Path:
    """Save a sentencepiece T5 tokenizer and a 2-layer, d_model 32 ``T5EncoderModel`` to ``out_dir/t5``."""
    t5_dir = Path(out_dir) / T5_DIR
    t5_dir.mkdir(parents=True, exist_ok=True)
    (t5_dir / "spiece.model").write_bytes(train_sentencepiece(caption_corpus()))
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (t5_dir / stale).unlink(missing_ok=True)  # else from_pretrained would read them, not spiece.model
    # from_pretrained (not the constructor) converts spiece.model into the fast tokenizer's vocabulary.
    tokenizer = T5Tokenizer.from_pretrained(str(t5_dir))
    tokenizer.save_pretrained(str(t5_dir))
    _save_tiny_t5_encoder(t5_dir, tokenizer, seed=seed)
    logger.info("tiny T5 (vocab %d) saved to %s", len(tokenizer), t5_dir)
    return t5_dir


def _save_tiny_t5_encoder(t5_dir: Path, tokenizer, *, seed: int) -> None:
    """Save a random 2-layer, d_model 32 ``T5EncoderModel`` for ``tokenizer``'s vocabulary to ``t5_dir``."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / Flan-T5, the family PixArt-Σ's T5-XXL belongs to
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(str(t5_dir))


# The toy world's caption grammar (``manifests.toy.caption``) beside its names: every word a toy caption uses.
TOY_GRAMMAR_WORDS = ("a", "at", "the", "in", "and", "on", "plain", "to", "gradient", "background")
# Word pieces score 0 and characters far below, so a toy caption is one piece per word (and one per comma),
# while any other text still tokenises (character by character) instead of collapsing to <unk>.
CHARACTER_PIECE_SCORE = -10.0


def toy_vocabulary() -> list[str]:
    """Every word of a toy-world caption, sorted: the names in ``manifests.toy`` and its grammar words."""
    names = (*COLOURS, *SHAPES, *POSITIONS, *BACKGROUNDS, *TOY_GRAMMAR_WORDS)
    return sorted({word for name in names for word in name.split()})


def build_toy_t5(out_dir: Path, *, seed: int = 0) -> Path:
    """Save a word-level T5 tokenizer for the toy world and a random tiny ``T5EncoderModel`` to ``out_dir/toy_t5``.

    The sentencepiece tiny T5 (``build_tiny_t5``) splits a toy caption into ~89 pieces, mostly characters;
    this one is T5's own layout (a Unigram model, ``▁`` word prefix, pad 0, eos 1, unk 2, saved as
    ``tokenizer.json``) with one piece per toy word, so a caption is 14–34 tokens with </s> (mean 22 over
    2,000 scenes; ``TOY_MAX_TOKENS`` holds the longest). It loads with ``AutoTokenizer.from_pretrained`` like
    the real T5-XXL tokenizer.
    """
    t5_dir = Path(out_dir) / TOY_T5_DIR
    t5_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (t5_dir / stale).unlink(missing_ok=True)
    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's special ids 0, 1, 2
    vocab += [(f"▁{word}", 0.0) for word in toy_vocabulary()] + [(",", 0.0), ("▁", CHARACTER_PIECE_SCORE)]
    vocab += [(c, CHARACTER_PIECE_SCORE) for c in characters if c != ","]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(str(t5_dir))
    _save_tiny_t5_encoder(t5_dir, tokenizer, seed=seed)
    logger.info("toy T5 (vocab %d) saved to %s", len(tokenizer), t5_dir)
    return t5_dir


def build_tiny_vae(
    out_dir: Path,
    *,
    scaling_factor: float = SDXL_VAE_SCALING_FACTOR,
    name: str = "vae",
    seed: int | None = None,
    downsample: int = VAE_DOWNSAMPLE,
) -> Path:
    """Save a tiny 4-channel ``AutoencoderKL`` with an 8× (SD/SDXL's 4 blocks) or 4× (3 blocks, the toy world's
    VAEs) downsample to ``out_dir/name``.

    ``seed`` defaults to one derived from ``name`` so differently named VAEs get different weights.
    """
    blocks = {8: 4, 4: 3}.get(downsample)
    if blocks is None:
        raise ValueError(f"downsample must be 8 or 4, got {downsample}")
    vae_dir = Path(out_dir) / name
    if seed is None:
        seed = sum(name.encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=(16, 32, 32, 32)[:blocks],
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=64,
            scaling_factor=scaling_factor,
        )
    calibrate_posterior_(vae)
    vae.save_pretrained(str(vae_dir))
    logger.info("tiny VAE (scaling_factor %s) saved to %s", scaling_factor, vae_dir)
    return vae_dir


TINY_POSTERIOR_STD = 0.05  # posterior std of the scaled latents: sharp, as a trained VAE's is


@torch.no_grad()
def calibrate_posterior_(vae: AutoencoderKL) -> None:
    """Give the random VAE a trained one's latent statistics, so training on it behaves like the real thing.

    A real SD/SDXL VAE's scaling factor brings its latents to about unit variance and its posterior is
    sharp. Randomly initialised, the tiny one has latents near 0 and a posterior std near 1 (a sampled
    latent would be mostly noise), so the 1×1 ``quant_conv`` is rescaled: mean channels to std
    1/scaling_factor on synthetic images, log-variance channels to a constant TINY_POSTERIOR_STD.
    """
    channels = vae.config.latent_channels
    scale = vae.config.scaling_factor
    images = [synthetic_image(i, (64, 64)) for i in range(8)]
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images]
    )
    moments = vae.quant_conv(vae.encoder(pixels))  # (8, 2C, 64 / f, 64 / f)
    mean = moments[:, :channels]
    conv = vae.quant_conv
    gain = (1.0 / scale) / mean.std().item()
    conv.weight[:channels] *= gain
    conv.bias[:channels] = (conv.bias[:channels] - mean.mean().item()) * gain
    conv.weight[channels:] = 0.0
    conv.bias[channels:] = 2.0 * float(np.log(TINY_POSTERIOR_STD / scale))


# (height, width) in pixels of the synthetic images, cycled: square, landscape and portrait buckets.
SYNTHETIC_SIZES = ((64, 64), (48, 96), (96, 48))


def synthetic_image(index: int, size: tuple[int, int]) -> Image.Image:
    """A distinct picture per index: a background colour, a disc and a bar in other colours."""
    rng = np.random.default_rng(index)
    height, width = size
    colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3)]
    image = Image.new("RGB", (width, height), colours[0])
    draw = ImageDraw.Draw(image)
    cx, cy, r = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height, min(size) * 0.25
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colours[1])
    top = int(rng.uniform(0.0, 0.7) * height)
    draw.rectangle((0, top, width, top + height // 6), fill=colours[2])
    return image


def synthetic_caption(index: int) -> tuple[str, str]:
    """(original, VLM-style) captions, distinct for the first len(subjects) × len(settings) indices."""
    subject = _SUBJECTS[index % len(_SUBJECTS)]
    setting = _SETTINGS[(index // len(_SUBJECTS)) % len(_SETTINGS)]
    return f"a photo of a {subject} {setting}", f"A detailed picture showing a {subject} {setting}."


def write_synthetic_shards(
    out_dir: Path,
    *,
    num_images: int,
    samples_per_shard: int,
    resolutions: tuple[int, ...] = (32, 64),
    sizes: tuple[tuple[int, int], ...] = SYNTHETIC_SIZES,
    t5: str | None = None,
    vae: str | None = None,
    vae_resolutions: tuple[int, ...] = (),
    max_tokens: int = 300,
    prompt_case: str = "lower",
    toy_seed: int | None = None,
) -> Path:
    """Training shards in the layout ``manifests.materialize`` writes, without Ray (tests, benchmarks).

    With ``toy_seed`` the images are toy-world scenes ``0…num_images-1`` of that corpus (``manifests.toy``),
    rendered at 4× their size (cropped to the bucket as materialize crops a large original), and both captions
    are the scene's caption, the truth.

    Each sample: ``<key>.png``, ``<key>.json`` (key, size, both captions, buckets per resolution), and when
    the encoders are given ``t5_orig.npy``/``t5_vlm.npy`` and ``vae<res>.npy``; the folder gets
    ``shards.json`` (features recorded) and ``t5_null.npy``.
    """
    from manifests.buckets import nearest_bucket, resize_to_cover_and_crop
    from manifests.features import NULL_CAPTION_FILE, T5Features, VaeFeatures
    from manifests.io import atomic_write_bytes
    from manifests.tars import json_bytes, npy_bytes, write_shard

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    text = T5Features(t5, max_tokens=max_tokens, prompt_case=prompt_case, device=device) if t5 else None
    latents = VaeFeatures(vae, device=device) if vae else None
    samples = []
    for index in range(num_images):
        height, width = sizes[index % len(sizes)]
        if toy_seed is None:
            image = synthetic_image(index, (height, width))
            orig, vlm = synthetic_caption(index)
        else:
            scene = scene_for(toy_seed, index)
            height, width = 4 * height, 4 * width
            image, orig = render(scene, width, height), caption(scene)
            vlm = orig
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = f"{index:06d}"
        buckets = {str(r): list(nearest_bucket(height, width, r)) for r in resolutions}
        meta = {"key": key, "width": width, "height": height, "caption_orig": orig, "caption_vlm": vlm}
        sample = {"__key__": key, "png": buffer.getvalue(), "json": json_bytes({**meta, "buckets": buckets})}
        if text is not None:
            features = text([orig, vlm])
            sample["t5_orig.npy"], sample["t5_vlm.npy"] = npy_bytes(features[0]), npy_bytes(features[1])
        for res in vae_resolutions:
            crop = resize_to_cover_and_crop(image, nearest_bucket(height, width, res))
            sample[f"vae{res}.npy"] = npy_bytes(latents([crop])[0])
        samples.append(sample)
    shards = [samples[i : i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
    for number, shard in enumerate(shards):
        write_shard(out_dir / f"train-{number:06d}.tar", shard)
    if text is not None:
        atomic_write_bytes(out_dir / NULL_CAPTION_FILE, npy_bytes(text([""])[0]))
    info = {
        "num_samples": len(samples),
        "num_shards": len(shards),
        "features": {
            "t5": t5,
            "prompt_case": prompt_case if t5 else None,
            "vae": vae,
            "vae_resolutions": list(vae_resolutions),
            "vae_scaling_factor": latents.scaling_factor if latents is not None else None,
        },
    }
    atomic_write_bytes(out_dir / "shards.json", json.dumps(info, indent=2, sort_keys=True).encode())
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m training.tiny --output DIR`` writes DIR/t5, DIR/vae (SDXL-like), DIR/vae_sd (SD-like)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_bars()  # no "Writing model shards" \r bar in a log file
    print(f"t5:     {build_tiny_t5(args.output)}")
    print(f"toy_t5: {build_toy_t5(args.output)}")
    print(f"vae:    {build_tiny_vae(args.output, scaling_factor=SDXL_VAE_SCALING_FACTOR, name='vae')}")
    print(f"vae_sd: {build_tiny_vae(args.output, scaling_factor=SD_VAE_SCALING_FACTOR, name='vae_sd')}")


if __name__ == "__main__":
    main()
