"""Two-stage retrieval: the single-vector index finds each query's top `serve.rerank_k`
candidates, and the model's re-ranker (models/entityclip.py: GI-ITM `itm`, FILIP's
`late_interaction`, or the `xattn_fusion` matcher) re-scores and reorders them. Used alike by
the Retriever (serving) and the evaluator, so the Recall@K of a re-ranked configuration measures
exactly what is served.

Cost: one pair score per candidate, on token features. Gallery images' tokens come from the
index (`images.tokens.npy`), query-side features are computed once per query, and texts ranked
for an image query are encoded again from the index's text and explanation (text encoding is
cheap next to decoding and encoding images).
"""

from __future__ import annotations

import numpy as np
import torch

from entityclip.errors import ConfigError
from entityclip.index import EmbeddingIndex
from entityclip.models.entityclip import EntityCLIP, ImageFeatures, TextFeatures

# Re-rankers that are part of their variant's definition: `auto` runs them.
DEFINING = ("late_interaction", "xattn_fusion")
PAIRS_PER_BATCH = 1024  # pairs scored together: bounds the memory of late interaction


def choose(model: EntityCLIP, requested: str) -> str | None:
    """The re-ranker to run for `serve.rerank` = `requested`, or None for the first stage alone."""
    if requested == "auto":
        return model.reranker if model.reranker in DEFINING else None
    if requested == "none":
        return None
    if requested != model.reranker:
        has = f"its re-ranker is {model.reranker}" if model.reranker else "it has none"
        raise ConfigError(f"serve.rerank is {requested}, which variant {model.model_cfg.variant} cannot run: {has}")
    return requested


class Reranker:
    """A model's re-ranker over one gallery index."""

    def __init__(self, model: EntityCLIP, index: EmbeddingIndex, name: str, k: int):
        if index.image_tokens is None:
            raise ConfigError(f"the gallery index has no token features for the {name} re-ranker: "
                              "rebuild it with `entityclip index`")
        if k < 1:
            raise ConfigError(f"serve.rerank_k must be at least 1, not {k}")
        self.model, self.index, self.name, self.k = model, index, name, k

    @classmethod
    def for_model(cls, model: EntityCLIP, index: EmbeddingIndex | None, requested: str, k: int) -> "Reranker | None":
        name = choose(model, requested)
        return cls(model, index, name, k) if name and index is not None else None

    @property
    def info(self) -> dict:
        return {"reranker": self.name, "rerank_k": self.k}

    def image_features(self, rows: np.ndarray) -> ImageFeatures:
        """Features of gallery images (index rows) from their stored tokens."""
        return ImageFeatures.from_tokens(torch.from_numpy(self.index.image_tokens[rows].astype(np.float32)))

    @torch.no_grad()
    def text_features(self, rows: np.ndarray) -> TextFeatures:
        """Features of the index's texts (rows of texts.parquet), each with its explanation."""
        meta = self.index.meta["texts"]
        texts, explanations = meta.column("text"), meta.column("explanation")
        return self.model.text_features([texts[i] for i in rows], [explanations[i] for i in rows])

    @torch.no_grad()
    def score_images(self, queries: TextFeatures, query_rows: np.ndarray, image_rows: np.ndarray) -> np.ndarray:
        """[P] scores of the pairs (text query query_rows[p], gallery image image_rows[p])."""
        return self._score(lambda q, c: (self.image_features(c), queries.select(torch.from_numpy(q))),
                           query_rows, image_rows, text_query=True)

    @torch.no_grad()
    def score_texts(self, queries: ImageFeatures, query_rows: np.ndarray, text_rows: np.ndarray) -> np.ndarray:
        """[P] scores of the pairs (image query query_rows[p], gallery text text_rows[p])."""
        unique, inverse = np.unique(text_rows, return_inverse=True)
        texts = self.text_features(unique)
        return self._score(lambda q, c: (queries.select(torch.from_numpy(q)), texts.select(torch.from_numpy(c))),
                           query_rows, inverse, text_query=False)

    def _score(self, pair_features, query_rows: np.ndarray, items: np.ndarray, text_query: bool) -> np.ndarray:
        out = []
        for start in range(0, len(query_rows), PAIRS_PER_BATCH):
            img, txt = pair_features(query_rows[start:start + PAIRS_PER_BATCH], items[start:start + PAIRS_PER_BATCH])
            out.append(self.model.pair_scores(img, txt, text_query).float().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
