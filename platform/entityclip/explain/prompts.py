"""The explanation prompt, the cache key derived from it, and how a prompt is fitted into an
LLM's context window."""

from __future__ import annotations

import hashlib
from typing import Callable

PROMPT_VERSION = "v2"

_TEMPLATE = (
    "You are a news archivist. For each entity named in the news text below, explain in one "
    "or two sentences what kind of entity it is and what it looks like: its colours, emblem, "
    "pattern and usual setting. Describe appearance only; do not repeat the news or the names.\n"
    "Text: {text}\n"
    "Entities: {entities}\n"
    "Explanation:"
)


def build_prompt(text: str, entities: list[str]) -> str:
    return _TEMPLATE.format(text=text.strip(), entities=", ".join(entities) if entities else "(find them in the text)")


def explanation_key(text: str, entities: list[str]) -> str:
    """Hash of the full prompt: the same input under the same prompt version is explained once."""
    return hashlib.sha256(f"{PROMPT_VERSION}\n{build_prompt(text, entities)}".encode()).hexdigest()[:32]


def _longest_fitting(n: int, fits: Callable[[int], bool]) -> int:
    """The largest k in [0, n] with fits(k), for fits monotone (true up to some k)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fit_prompt(text: str, entities: list[str], count_tokens: Callable[[str], int], budget: int) -> tuple[str, bool]:
    """(the prompt, whether it was cut) with at most `budget` tokens: a text too long for the
    model's window keeps its leading words (news puts the who and what first) and ends in
    "...", and if the entity list alone is too long, its trailing names go. The instruction is
    never cut: without it the answer is not an explanation."""
    prompt = build_prompt(text, entities)
    if count_tokens(prompt) <= budget:
        return prompt, False
    words = text.split()

    def with_words(k: int, names: list[str]) -> str:
        return build_prompt(" ".join(words[:k]) + " ...", names)

    keep_names = _longest_fitting(len(entities), lambda k: count_tokens(with_words(0, entities[:k])) <= budget)
    names = entities[:keep_names]
    keep_words = _longest_fitting(len(words), lambda k: count_tokens(with_words(k, names)) <= budget)
    return with_words(keep_words, names), True
