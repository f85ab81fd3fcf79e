"""Image-text(-explanation) pairs: the join of samples.parquet and explanations.parquet that
indexing and evaluation read (training streams shards instead: train/ingest.py)."""

from __future__ import annotations

from dataclasses import dataclass

from entityclip import storage
from entityclip.errors import InputError


@dataclass(frozen=True)
class Pair:
    sample_id: str
    image_uri: str
    text: str
    explanation: str
    entities: tuple[str, ...]
    split: str
    boxes: tuple[tuple[float, ...], ...] = ()  # object regions (data/samples.py)
    reference_uri: str | None = None  # a composed query's reference image (data/samples.py)


def load_pairs(samples_uri: str, explanations_uri: str, splits: list[str] | None = None) -> list[Pair]:
    explanations = {r["sample_id"]: r["explanation"]
                    for r in storage.read_parquet(explanations_uri).select(["sample_id", "explanation"]).to_pylist()}
    pairs = []
    for s in storage.read_parquet(samples_uri).to_pylist():
        if splits is not None and s["split"] not in splits:
            continue
        if s["sample_id"] not in explanations:
            raise InputError(f"sample {s['sample_id']} has no explanation in {explanations_uri}; rerun `entityclip explain`")
        pairs.append(Pair(s["sample_id"], s["image_uri"], s["text"], explanations[s["sample_id"]],
                          tuple(s["entities"]), s["split"], tuple(tuple(b) for b in s.get("boxes") or ()),
                          s.get("reference_uri")))
    return pairs


NAME_MASK = "the entity"


def mask_names(text: str, names: tuple[str, ...]) -> str:
    for name in names:
        text = text.replace(name, NAME_MASK)
    return text
