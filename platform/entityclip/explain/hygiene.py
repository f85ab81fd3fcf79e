"""Rules that turn an LLM's raw generation into an explanation the matcher may read.

1. Only the first paragraph counts: a model that runs on into a new "Text:" line or another
   paragraph is cut at the first line break.
2. A sentence repeated word for word (a small model's loop) is kept once.
3. Entity names are replaced by "this entity": an explanation must describe looks, and a
   name in it lets a matcher learn names instead of appearance (the paper's premise).
4. At most `max_chars` characters, cut after the last whole sentence that fits (or, for one
   overlong sentence, at a word boundary, ending in "...").
5. Nothing left: `NO_EXPLANATION`, which the stage counts and reports.
"""

from __future__ import annotations

import re

NO_EXPLANATION = "No explanation is available."
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _unname(text: str, names: list[str]) -> str:
    for name in sorted({n for n in names if n.strip()}, key=len, reverse=True):  # longest first
        text = re.sub(rf"(?<!\w){re.escape(name.strip())}(?!\w)", "this entity", text, flags=re.IGNORECASE)
    # A sentence that now starts with the replacement starts with a capital.
    return re.sub(r"(^|[.!?]\s+)this entity", lambda m: m.group(1) + "This entity", text)


def clean_explanation(raw: str, names: list[str], max_chars: int) -> str:
    first = raw.strip().split("\n", 1)[0].strip()
    unique: list[str] = []
    for sentence in _sentences(_unname(first, names)):
        if sentence not in unique:
            unique.append(sentence)
    text = ""
    for sentence in unique:
        longer = f"{text} {sentence}".strip()
        if len(longer) > max_chars:
            break
        text = longer
    if not text and unique:  # the first sentence alone is too long
        cut = unique[0][: max(1, max_chars - 3)]
        text = (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:") + "..."
    return text or NO_EXPLANATION
