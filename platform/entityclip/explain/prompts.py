"""The explanation prompt and the cache key derived from it."""

from __future__ import annotations

import hashlib

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
