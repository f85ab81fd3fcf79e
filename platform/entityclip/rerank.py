"""Two-stage retrieval: the single-vector index finds each query's top `serve.rerank_k`
candidates, and a re-ranker re-scores and reorders them. Used alike by the Retriever (serving)
and the evaluator, so the Recall@K of a re-ranked configuration measures exactly what is served.

Two kinds of re-ranker:
- the model's own (models/entityclip.py): GI-ITM `itm`, FILIP's `late_interaction` or the
  `xattn_fusion` matcher; its pair score replaces the first stage's;
- training-free ones any model can run on its token features (`TRAINING_FREE`): MACK's word
  prototypes (models/mack.py) and HOSA's region reconstruction (models/hosa.py). Their score is
  added to the first stage's similarity, weighted by `serve.rerank_weight`: they refine a
  matcher rather than replace it.

Cost: one pair score per candidate, on token features. Gallery images' tokens come from the
index (`images.tokens.npy`), query-side features are computed once per query, and texts ranked
for an image query are encoded again from the index's text and explanation (text encoding is
cheap next to decoding and encoding images).
"""

from __future__ import annotations

import numpy as np
import torch

from entityclip.config import ServeConfig
from entityclip.errors import ConfigError
from entityclip.index import EmbeddingIndex
from entityclip.models import hosa, mack
from entityclip.models.entityclip import VARIANT_SPECS, EntityCLIP, ImageFeatures, TextFeatures

# Re-rankers that are part of their variant's definition: `auto` runs them.
DEFINING = ("late_interaction", "xattn_fusion")
TRAINING_FREE = ("mack", "hosa")
PROTOTYPE_SPLIT = "train"  # MACK's labelled regions: the boxes of this split's images
PAIRS_PER_BATCH = 1024  # pairs scored together: bounds the memory of late interaction


def choose(model: EntityCLIP, requested: str) -> str | None:
    """The re-ranker to run for `serve.rerank` = `requested`, or None for the first stage alone."""
    if requested == "auto":
        return model.reranker if model.reranker in DEFINING else None
    if requested == "none":
        return None
    if requested in TRAINING_FREE:
        return requested
    if requested != model.reranker:
        has = f"its re-ranker is {model.reranker}" if model.reranker else "it has none"
        raise ConfigError(f"serve.rerank is {requested}, which variant {model.model_cfg.variant} cannot run: {has}")
    return requested


def check_runnable(variant: str, name: str) -> None:
    """A ConfigError when training-free re-ranker `name` cannot run on `variant`'s tokens."""
    if name == "mack" and VARIANT_SPECS[variant].adaptive_patches:
        raise ConfigError(f"the mack re-ranker pools the image's grid patches inside boxes; variant {variant} "
                          "keeps adaptive patches instead (hosa can run on them)")


class Reranker:
    """A re-ranker over one gallery index."""

    def __init__(self, model: EntityCLIP, index: EmbeddingIndex, name: str, k: int, weight: float = 1.0,
                 mack_refine_steps: int = 0):
        if index.image_tokens is None:
            has = "" if name not in TRAINING_FREE or model.reranker else (
                f" (variant {model.model_cfg.variant} keeps none: set index.image_tokens=true)")
            raise ConfigError(f"the gallery index has no token features for the {name} re-ranker{has}: "
                              "rebuild it with `entityclip index`")
        if k < 1:
            raise ConfigError(f"serve.rerank_k must be at least 1, not {k}")
        check_runnable(model.model_cfg.variant, name)
        self.model, self.index, self.name, self.k, self.weight = model, index, name, k, weight
        self.prototypes = self._prototypes(mack_refine_steps) if name == "mack" else None

    @classmethod
    def for_model(cls, model: EntityCLIP, index: EmbeddingIndex | None, serve: ServeConfig) -> "Reranker | None":
        """The re-ranker `serve.rerank` asks for, or None for the first stage alone."""
        name = choose(model, serve.rerank)
        if not name or index is None:
            return None
        return cls(model, index, name, serve.rerank_k, serve.rerank_weight, serve.mack_refine_steps)

    def _prototypes(self, refine_steps: int) -> mack.WordPrototypes:
        """MACK's word prototypes from the labelled regions of the gallery's train-split images;
        refined, with `refine_steps`, on every gallery image's regions (no labels read)."""
        images = self.index.meta["images"]
        splits, entities, boxes = images.column("split"), images.column("entities"), images.column("boxes")
        rows = [i for i, s in enumerate(splits) if s == PROTOTYPE_SPLIT and boxes[i]]
        if not rows:
            raise ConfigError(f"the mack re-ranker needs labelled regions: images of split {PROTOTYPE_SPLIT} "
                              "with entities and boxes in the gallery index (data.boxes_path for real data)")
        patches = torch.from_numpy(self.index.image_tokens[rows, 1:].astype(np.float32))
        prototypes = mack.build_prototypes(patches, [entities[i] for i in rows], [boxes[i] for i in rows])
        if refine_steps:
            all_patches = torch.from_numpy(self.index.image_tokens[:, 1:].astype(np.float32))
            regions = torch.cat([mack.region_features(p, b) for p, b in zip(all_patches, boxes) if b])
            prototypes = mack.refine(prototypes, regions, patches, steps=refine_steps)
        return prototypes

    @property
    def info(self) -> dict:
        return {"reranker": self.name, "rerank_k": self.k} | (
            {"rerank_weight": self.weight} if self.name in TRAINING_FREE else {})

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
    def score_images(self, queries: TextFeatures, query_rows: np.ndarray, image_rows: np.ndarray,
                     first_stage: np.ndarray) -> np.ndarray:
        """[P] scores of the pairs (text query query_rows[p], gallery image image_rows[p]) whose
        first-stage similarities are `first_stage` [P]."""
        return self._score(lambda q, c: (self.image_features(c), queries.select(torch.from_numpy(q))),
                           query_rows, image_rows, first_stage, text_query=True)

    @torch.no_grad()
    def score_texts(self, queries: ImageFeatures, query_rows: np.ndarray, text_rows: np.ndarray,
                    first_stage: np.ndarray) -> np.ndarray:
        """[P] scores of the pairs (image query query_rows[p], gallery text text_rows[p])."""
        unique, inverse = np.unique(text_rows, return_inverse=True)
        texts = self.text_features(unique)
        return self._score(lambda q, c: (queries.select(torch.from_numpy(q)), texts.select(torch.from_numpy(c))),
                           query_rows, inverse, first_stage, text_query=False)

    def _score(self, pair_features, query_rows: np.ndarray, items: np.ndarray, first_stage: np.ndarray,
               text_query: bool) -> np.ndarray:
        out = []
        for start in range(0, len(query_rows), PAIRS_PER_BATCH):
            img, txt = pair_features(query_rows[start:start + PAIRS_PER_BATCH], items[start:start + PAIRS_PER_BATCH])
            out.append(self._pair_scores(img, txt, text_query).float().numpy())
        scores = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        if self.name in TRAINING_FREE:
            return np.asarray(first_stage, dtype=np.float32) + self.weight * scores
        return scores

    def _pair_scores(self, img: ImageFeatures, txt: TextFeatures, text_query: bool) -> torch.Tensor:
        if self.name == "mack":
            eot = txt.eot_index.tolist()
            texts = [self.model.tokenizer.decode(ids[1:end].tolist()) for ids, end in zip(txt.ids, eot)]
            return mack.pair_scores(self.prototypes, img.tokens[:, 1:], texts)
        if self.name == "hosa":
            return hosa.pair_scores(img.tokens, txt.tokens, txt.padding, txt.eot_index)
        return self.model.pair_scores(img, txt, text_query)
