"""The tiny LLaVA: built offline, saved, loaded through the Auto classes like real weights, and batched
greedy generation with left padding equal to one-by-one generation."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from captioning import tiny
from captioning.captioner import chat, generate_captions, load_vlm, processor_min_side
from captioning.config import ModelConfig

PROMPTS = [
    "Describe.",
    "Analyze the image in a comprehensive and detailed manner.",
]  # different lengths: padding


def test_saved_small_and_loadable_by_auto_classes(tiny_llava, tmp_path):
    assert sum(p.stat().st_size for p in tiny_llava.iterdir()) < 1_000_000
    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32)
    assert isinstance(processor, LlavaProcessor) and isinstance(model, LlavaForConditionalGeneration)
    assert processor_min_side(processor) == tiny.IMAGE_SIZE
    # Deterministic: a second build with the same seed has the same weights.
    again = AutoModelForImageTextToText.from_pretrained(tiny.build_tiny_llava(tmp_path), dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_batched_left_padded_greedy_equals_one_by_one(tiny_llava, image_factory):
    processor, model = load_vlm(ModelConfig(model=str(tiny_llava)))
    assert processor.tokenizer.padding_side == "left"
    images = [image_factory(0, (40, 30)), image_factory(1, (50, 90))]
    texts = [
        processor.apply_chat_template(chat(p), add_generation_prompt=True, tokenize=False) for p in PROMPTS
    ]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs.input_ids == image_token).sum(dim=1).tolist() == [tiny.NUM_IMAGE_TOKENS] * 2
    assert inputs.attention_mask[0, 0] == 0 and inputs.attention_mask[:, -1].all()  # padded on the left
    with torch.no_grad():  # projected patch features per image: (16, D) each, one per <image> token
        features = model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
    assert [f.shape[0] for f in features] == [tiny.NUM_IMAGE_TOKENS] * 2

    gen = {"max_new_tokens": 8, "do_sample": False}
    batched = generate_captions(model, processor, images, PROMPTS, gen)
    single = [
        generate_captions(model, processor, [im], [p], gen)[0] for im, p in zip(images, PROMPTS, strict=True)
    ]
    assert batched == single
    assert all(batched)
