"""Each guard with hand-made captions, exact reasons; the token budget with a word counter and real T5."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from captioning import guards
from captioning.config import PROMPTS, REFUSAL_PHRASES, GuardConfig
from manifests import Rejected

PROMPT = PROMPTS["share-captioner"]
GOOD = "A red fox sits on a mossy log in a pine forest. Morning light falls from the left."


def count_words(text: str) -> int:
    """A stand-in tokenizer: one token per word plus the closing </s>."""
    return len(text.split()) + 1


@pytest.mark.parametrize("caption", [None, "", "   ", "\n\t", " ... !? "])
def test_empty(caption):
    assert guards.check_empty(caption) == Rejected("empty")


def test_empty_keeps_text():
    assert guards.check_empty(GOOD) == GOOD


@pytest.mark.parametrize(
    "caption",
    [
        "I'm sorry, but I can't help with that.",
        "I’m sorry, I cannot describe this image.",  # typographic apostrophe
        "I cannot determine what is in the picture.",
        "As an AI, I do not see images.",
        "Sorry. I am unable to view the image.",
    ],
)
def test_refusal(caption):
    assert guards.check_refusal(caption, REFUSAL_PHRASES) == Rejected("refusal")


def test_refusal_phrase_inside_a_caption_is_not_a_refusal():
    caption = "A chalkboard in a classroom. The board reads 'I cannot wait for summer' in white letters."
    assert guards.check_refusal(caption, REFUSAL_PHRASES) == caption


@pytest.mark.parametrize(
    "caption",
    [
        PROMPT,
        "analyze the image in a comprehensive and detailed manner",
        "Analyze the image in a comprehensive and detailed manner. The image shows a dog.",
        "Analyze the image in",  # the prompt's opening words, nothing else
    ],
)
def test_prompt_echo(caption):
    assert guards.check_prompt_echo(caption, PROMPT) == Rejected("prompt_echo")


def test_prompt_words_inside_a_caption_are_not_an_echo():
    caption = "The image shows a detailed manner of painting."
    assert guards.check_prompt_echo(caption, PROMPT) == caption
    assert guards.check_prompt_echo("Analyze", PROMPT) == "Analyze"  # one word is not an echo


@pytest.mark.parametrize(
    "caption",
    [
        "The sky is blue. The sky is blue. The sky is blue. The sky is blue.",
        "A cat on a mat " + "and a dog " * 6,
        "very " * 5 + "tall tower",
        # a loop longer than 16 words, with variations: caught by the distinct-trigram ratio
        " ".join(
            "The cat is black. " + ["The dog is brown.", "The bird is red.", "The fish is gold."][i % 3]
            for i in range(8)
        ),
    ],
)
def test_repetition(caption):
    assert guards.check_repetition(caption) == Rejected("repetition")


def test_repetition_keeps_normal_captions():
    long_caption = (
        "A wide street in the evening with wet cobblestones reflecting yellow shop lights. On the left a "
        "bakery displays bread behind a fogged window, and a bicycle leans against a lamp post. On the right "
        "two people under a green umbrella walk past a red door. Above, strings of small bulbs cross the "
        "street between balconies with flower boxes, and the sky fades from orange to deep blue."
    )
    assert guards.check_repetition(GOOD) == GOOD
    assert guards.check_repetition(long_caption) == long_caption
    assert guards.check_repetition("A very very tall tower") == "A very very tall tower"  # 2 copies: fine


def test_longest_loop():
    assert guards.longest_loop("a b c a b c a b c d".split(), max_period=4) == 3
    assert guards.longest_loop("a b c d".split(), max_period=4) == 1


def test_budget_under_is_untouched():
    assert guards.fit_token_budget(GOOD, count_tokens=count_words, budget=100, truncate_at_sentence=True) == (
        guards.Budgeted(GOOD, count_words(GOOD), truncated=False)
    )


def test_budget_over_cuts_at_the_last_sentence_that_fits():
    caption = "One two three. Four five six! Seven eight nine ten eleven."
    result = guards.fit_token_budget(caption, count_tokens=count_words, budget=8, truncate_at_sentence=True)
    assert result == guards.Budgeted("One two three. Four five six!", 7, truncated=True)


def test_budget_over_without_truncation_only_flags():
    caption = "One two three. Four five six."
    result = guards.fit_token_budget(caption, count_tokens=count_words, budget=4, truncate_at_sentence=False)
    assert result == guards.Budgeted(caption, 7, truncated=True)


def test_budget_first_sentence_too_long_cuts_at_a_word():
    caption = "One two three four five six seven. Eight."
    result = guards.fit_token_budget(caption, count_tokens=count_words, budget=4, truncate_at_sentence=True)
    assert result == guards.Budgeted("One two three", 4, truncated=True)


def test_budget_nothing_fits_is_rejected():
    result = guards.fit_token_budget(
        "Supercalifragilistic word", count_tokens=lambda t: 10, budget=4, truncate_at_sentence=True
    )
    assert result == Rejected("over_budget")


def test_budget_with_the_t5_tokenizer(tiny_t5):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids)

    caption = " ".join(f"A red cat sits on mat number {i}." for i in range(40))
    assert count(caption) > 60
    result = guards.fit_token_budget(caption, count_tokens=count, budget=60, truncate_at_sentence=True)
    assert result.truncated and result.num_tokens <= 60 and result.num_tokens == count(result.caption)
    assert result.caption.endswith(".") and caption.startswith(result.caption)
    assert count(caption[: len(result.caption) + 30]) > 60  # the next sentence would not have fitted


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("", "empty"),
        ("I'm sorry, I can't.", "refusal"),
        (PROMPT, "prompt_echo"),
        ("the end " * 7 + "the end", "repetition"),
        (GOOD, None),
    ],
)
def test_apply_guards_reasons(caption, reason):
    result = guards.apply_guards(
        caption, prompt=PROMPT, cfg=GuardConfig(tokenizer="unused"), count_tokens=count_words
    )
    assert result.reason == reason
    assert result.caption == caption  # rejected captions keep their text for inspection


def test_apply_guards_budget_flags_and_cuts():
    cfg = GuardConfig(tokenizer="unused", token_budget=13)
    result = guards.apply_guards(GOOD, prompt=PROMPT, cfg=cfg, count_tokens=count_words)
    assert result == guards.GuardResult("A red fox sits on a mossy log in a pine forest.", 13, True, None)
