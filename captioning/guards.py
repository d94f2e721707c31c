"""Caption guards: pure functions over one caption, returning the caption or ``Rejected(reason)``.

Reasons written to the manifest: ``empty``, ``refusal``, ``prompt_echo``, ``repetition``, ``over_budget``.
The token budget is not a rejection: a caption over it is flagged ``truncated`` (and cut at a sentence
end when configured), because the trainer would cut it at the same budget anyway.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from captioning.config import GuardConfig
from manifests import Rejected

EMPTY = "empty"
REFUSAL = "refusal"
PROMPT_ECHO = "prompt_echo"
REPETITION = "repetition"
OVER_BUDGET = "over_budget"

_WORD = re.compile(r"[\w']+")
_SENTENCE_END = re.compile(r"[.!?。](?=[\s\"')\]]|$)[\"')\]]*")
_WHITESPACE = re.compile(r"\s+")
# Refusals come first; a phrase later in a caption ("a sign reading 'I cannot'") is not one.
_REFUSAL_WINDOW_CHARS = 120
_ECHO_MIN_WORDS = 3


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes); punctuation and spacing ignored."""
    return _WORD.findall(text.lower().replace("’", "'"))


def check_empty(caption: str | None) -> str | Rejected:
    """Reject a missing, empty or whitespace-only caption, or one with no word at all."""
    if caption is None or not caption.strip() or not words(caption):
        return Rejected(EMPTY)
    return caption


def check_refusal(caption: str, phrases: tuple[str, ...]) -> str | Rejected:
    """Reject a caption with a refusal phrase in its first sentence or opening its second ("Sorry. I
    cannot …"), within the first 120 characters; a quoted phrase later on is not a refusal."""
    opening = caption.strip().lower().replace("’", "'")[:_REFUSAL_WINDOW_CHARS]
    first_end = _SENTENCE_END.search(opening)
    first = opening[: first_end.end()] if first_end else opening
    second = opening[len(first) :].lstrip()
    if any(phrase in first or second.startswith(phrase) for phrase in phrases):
        return Rejected(REFUSAL)
    return caption


def check_prompt_echo(caption: str, prompt: str) -> str | Rejected:
    """Reject a caption that starts by repeating the prompt, or is the prompt's beginning (≥ 3 words)."""
    caption_words, prompt_words = words(caption), words(prompt)
    if not prompt_words:
        return caption
    if caption_words[: len(prompt_words)] == prompt_words:
        return Rejected(PROMPT_ECHO)
    if len(caption_words) >= _ECHO_MIN_WORDS and prompt_words[: len(caption_words)] == caption_words:
        return Rejected(PROMPT_ECHO)
    return caption


def longest_loop(tokens: list[str], max_period: int) -> int:
    """The most consecutive copies of any n-gram (n ≤ ``max_period``) in ``tokens``; 1 when none repeats."""
    best = 1
    for period in range(1, min(max_period, len(tokens) // 2) + 1):
        run = 0  # positions i with tokens[i] == tokens[i + period], consecutively
        for i in range(len(tokens) - period):
            run = run + 1 if tokens[i] == tokens[i + period] else 0
            best = max(best, 1 + run // period)
    return best


def distinct_ratio(tokens: list[str], n: int = 3) -> float:
    """Distinct n-grams over all n-grams (1.0 for text shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def check_repetition(
    caption: str,
    *,
    max_period: int = 16,
    min_repeats: int = 4,
    min_distinct_trigram_ratio: float = 0.5,
    distinct_min_words: int = 40,
) -> str | Rejected:
    """Reject degenerate repetition: one n-gram looping ``min_repeats`` times in a row, or a long
    caption made mostly of the same few trigrams (loops with small variations)."""
    tokens = words(caption)
    if longest_loop(tokens, max_period) >= min_repeats:
        return Rejected(REPETITION)
    if len(tokens) >= distinct_min_words and distinct_ratio(tokens, 3) < min_distinct_trigram_ratio:
        return Rejected(REPETITION)
    return caption


@dataclass(frozen=True)
class Budgeted:
    """A caption fitted to the token budget."""

    caption: str
    num_tokens: int
    truncated: bool  # the generated caption was over the budget (and was cut when configured)


def _cut_points(caption: str, pattern: re.Pattern) -> list[int]:
    return [m.end() for m in pattern.finditer(caption)]


def _longest_prefix_within(
    caption: str, cuts: list[int], count_tokens: Callable[[str], int], budget: int
) -> int | None:
    """The largest cut whose prefix has ≤ ``budget`` tokens (binary search: counts grow with the prefix)."""
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if count_tokens(caption[: cuts[mid]].rstrip()) <= budget:
            best, lo = cuts[mid], mid + 1
        else:
            hi = mid - 1
    return best


def fit_token_budget(
    caption: str, *, count_tokens: Callable[[str], int], budget: int, truncate_at_sentence: bool
) -> Budgeted | Rejected:
    """Count T5 tokens; over ``budget``, flag ``truncated`` and, when asked, cut at the last sentence end
    that fits (at a word boundary when not even the first sentence fits)."""
    num_tokens = count_tokens(caption)
    if num_tokens <= budget:
        return Budgeted(caption, num_tokens, truncated=False)
    if not truncate_at_sentence:
        return Budgeted(caption, num_tokens, truncated=True)
    end = _longest_prefix_within(caption, _cut_points(caption, _SENTENCE_END), count_tokens, budget)
    if end is None:
        word_ends = [m.start() for m in _WHITESPACE.finditer(caption)]
        end = _longest_prefix_within(caption, word_ends, count_tokens, budget)
    if end is None:
        return Rejected(OVER_BUDGET)
    cut = caption[:end].rstrip()
    return Budgeted(cut, count_tokens(cut), truncated=True)


@dataclass(frozen=True)
class GuardResult:
    caption: str | None
    num_tokens: int | None
    truncated: bool
    reason: str | None  # None: kept


def apply_guards(
    caption: str | None, *, prompt: str, cfg: GuardConfig, count_tokens: Callable[[str], int]
) -> GuardResult:
    """All guards in order (empty → refusal → prompt echo → repetition → token budget).

    A rejected caption keeps its text and token count so the manifest shows what was refused.
    """
    checked = check_empty(caption)
    if isinstance(checked, Rejected):
        return GuardResult(caption, None, False, checked.reason)
    caption = caption.strip()
    for check in (
        lambda c: check_refusal(c, cfg.refusal_phrases),
        lambda c: check_prompt_echo(c, prompt),
        lambda c: check_repetition(
            c,
            max_period=cfg.repetition_max_period,
            min_repeats=cfg.repetition_min_repeats,
            min_distinct_trigram_ratio=cfg.min_distinct_trigram_ratio,
            distinct_min_words=cfg.distinct_min_words,
        ),
    ):
        checked = check(caption)
        if isinstance(checked, Rejected):
            return GuardResult(caption, count_tokens(caption), False, checked.reason)
    budgeted = fit_token_budget(
        caption,
        count_tokens=count_tokens,
        budget=cfg.token_budget,
        truncate_at_sentence=cfg.truncate_at_sentence,
    )
    if isinstance(budgeted, Rejected):
        return GuardResult(caption, count_tokens(caption), True, budgeted.reason)
    return GuardResult(budgeted.caption, budgeted.num_tokens, budgeted.truncated, None)
