"""Image-text(-explanation) pairs: the join of samples.parquet and explanations.parquet that
training, indexing and evaluation read."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from entityclip import storage
from entityclip.data.images import read_image_tensor
from entityclip.errors import InputError


@dataclass(frozen=True)
class Pair:
    sample_id: str
    image_uri: str
    text: str
    explanation: str
    entities: tuple[str, ...]
    split: str


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
                          tuple(s["entities"]), s["split"]))
    return pairs


def _load(pair: Pair, image_size: int) -> torch.Tensor:
    try:
        return read_image_tensor(pair.image_uri, image_size)
    except InputError as exc:
        raise InputError(f"sample {pair.sample_id}: {exc}") from None


NAME_MASK = "the entity"


def mask_names(text: str, names: tuple[str, ...]) -> str:
    for name in names:
        text = text.replace(name, NAME_MASK)
    return text


class PairDataset(Dataset):
    """Decodes every image once up front: the synthetic and test sets fit in memory easily.

    `name_mask_prob` hides the entity names of a training text with that probability, so the
    model learns to match through the explanation, as it must for names it has never seen.
    """

    def __init__(self, pairs: list[Pair], image_size: int, name_mask_prob: float = 0.0, seed: int = 0):
        self.pairs = pairs
        self.images = [_load(p, image_size) for p in pairs]
        self.name_mask_prob = name_mask_prob
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        pair = self.pairs[i]
        text = pair.text
        if self.name_mask_prob and self.rng.random() < self.name_mask_prob:
            text = mask_names(text, pair.entities)
        return self.images[i], text, pair.explanation
