"""Recall@K in both directions from an embedding index, per test split."""

from __future__ import annotations

import numpy as np

from entityclip.config import EvalConfig
from entityclip.errors import ConfigError
from entityclip.index import EmbeddingIndex


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Percentage of queries (rows) with at least one relevant item among their top k columns."""
    order = np.argsort(-similarity, axis=1)
    hits = np.take_along_axis(relevant, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)
    return {k: float(100.0 * np.mean(first < k)) for k in ks}


def relevance_matrix(entities: list[tuple[str, ...]], mode: str) -> np.ndarray:
    """[N, N] boolean: pair = the diagonal; entities = items showing the same set of entities."""
    n = len(entities)
    if mode == "pair":
        return np.eye(n, dtype=bool)
    if mode == "entities":
        keys = [frozenset(e) for e in entities]
        return np.array([[a == b for b in keys] for a in keys], dtype=bool) | np.eye(n, dtype=bool)
    raise ConfigError(f"unknown evaluate.relevance {mode!r}; choose pair or entities")


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict[str, float]:
    """i2t_r{k}, t2i_r{k} and rsum (the sum of all of them) for row-aligned pairs."""
    sim = image_emb @ text_emb.T
    out = {f"i2t_r{k}": v for k, v in recall_at_k(sim, relevant, ks).items()}
    out |= {f"t2i_r{k}": v for k, v in recall_at_k(sim.T, relevant.T, ks).items()}
    out["rsum"] = sum(out.values())
    return out


def evaluate_index(index: EmbeddingIndex, cfg: EvalConfig) -> dict[str, dict[str, float]]:
    """{split: metrics}; images and texts of the split form each other's gallery."""
    results = {}
    images, texts = index.meta["images"], index.meta["texts"]
    text_row = {m["sample_id"]: i for i, m in enumerate(texts)}
    for split in cfg.splits:
        rows = [i for i, m in enumerate(images) if m["split"] == split]
        if not rows:
            continue
        text_rows = [text_row[images[i]["sample_id"]] for i in rows]
        relevant = relevance_matrix([tuple(images[i]["entities"]) for i in rows], cfg.relevance)
        metrics = retrieval_metrics(index.embeddings["images"][rows], index.embeddings["texts"][text_rows], relevant, cfg.ks)
        results[split] = {**metrics, "n": len(rows)}
    return results
