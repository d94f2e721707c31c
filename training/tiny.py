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
import logging
from pathlib import Path

import sentencepiece as spm
import torch
from diffusers import AutoencoderKL
from transformers import T5Config, T5EncoderModel, T5Tokenizer

logger = logging.getLogger(__name__)

SD_VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025
VAE_DOWNSAMPLE = 8  # 4 encoder blocks, the last without downsampling: 2**3, as in SD / SDXL
SPM_VOCAB_SIZE = 600  # a soft limit: the trainer stops earlier if the corpus runs out of pieces
T5_DIR = "t5"

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
    logger.info("tiny T5 (vocab %d) saved to %s", len(tokenizer), t5_dir)
    return t5_dir


def build_tiny_vae(
    out_dir: Path,
    *,
    scaling_factor: float = SDXL_VAE_SCALING_FACTOR,
    name: str = "vae",
    seed: int | None = None,
) -> Path:
    """Save a tiny 4-channel ``AutoencoderKL`` with an 8× downsample to ``out_dir/name``.

    ``seed`` defaults to one derived from ``name`` so differently named VAEs get different weights.
    """
    vae_dir = Path(out_dir) / name
    if seed is None:
        seed = sum(name.encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=64,
            scaling_factor=scaling_factor,
        )
    vae.save_pretrained(str(vae_dir))
    logger.info("tiny VAE (scaling_factor %s) saved to %s", scaling_factor, vae_dir)
    return vae_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m training.tiny --out DIR`` writes DIR/t5, DIR/vae (SDXL-like), DIR/vae_sd (SD-like)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"t5:     {build_tiny_t5(args.out)}")
    print(f"vae:    {build_tiny_vae(args.out, scaling_factor=SDXL_VAE_SCALING_FACTOR, name='vae')}")
    print(f"vae_sd: {build_tiny_vae(args.out, scaling_factor=SD_VAE_SCALING_FACTOR, name='vae_sd')}")


if __name__ == "__main__":
    main()
