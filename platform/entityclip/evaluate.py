"""Recall@K in both directions from an embedding index, per test split; with a re-ranker
(rerank.py), of the two-stage retrieval it serves."""

from __future__ import annotations

import numpy as np

from entityclip.config import EvalConfig
from entityclip.errors import ConfigError
from entityclip.index import EmbeddingIndex, rerank_order


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


def rerank_similarity(similarity: np.ndarray, k: int, rescore) -> np.ndarray:
    """`similarity` [Q, N] with each row's top-k columns re-scored by `rescore(query_rows,
    columns)` → scores and lifted above every other column in that order: argsorting the result
    ranks items as two-stage retrieval does."""
    k = min(k, similarity.shape[1])
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    rows = np.repeat(np.arange(similarity.shape[0]), k)
    scores = np.asarray(rescore(rows, top.reshape(-1)), dtype=np.float64).reshape(top.shape)
    reordered = np.take_along_axis(top, rerank_order(scores), axis=1)
    out = similarity.astype(np.float64, copy=True)
    out[rows.reshape(top.shape), reordered] = out.max() + 1 + np.arange(k, 0, -1)
    return out


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, relevant: np.ndarray, ks: list[int],
                      rerank_k: int = 0, rescore_texts=None, rescore_images=None) -> dict[str, float]:
    """i2t_r{k}, t2i_r{k} and rsum (the sum of all of them) for row-aligned pairs. With
    `rerank_k`, each query's top candidates are re-scored: rescore_texts(image_rows, text_rows)
    and rescore_images(text_rows, image_rows), rows local to these arrays."""
    sim = image_emb @ text_emb.T
    i2t, t2i = sim, sim.T
    if rerank_k:
        i2t, t2i = rerank_similarity(i2t, rerank_k, rescore_texts), rerank_similarity(t2i, rerank_k, rescore_images)
    out = {f"i2t_r{k}": v for k, v in recall_at_k(i2t, relevant, ks).items()}
    out |= {f"t2i_r{k}": v for k, v in recall_at_k(t2i, relevant.T, ks).items()}
    out["rsum"] = sum(out.values())
    return out


def evaluate_index(index: EmbeddingIndex, cfg: EvalConfig, reranker=None) -> dict[str, dict[str, float]]:
    """{split: metrics}; images and texts of the split form each other's gallery. With a
    `Reranker` (rerank.py), of two-stage retrieval."""
    results = {}
    images, texts = index.meta["images"], index.meta["texts"]
    text_row = {m["sample_id"]: i for i, m in enumerate(texts)}
    for split in cfg.splits:
        rows = [i for i, m in enumerate(images) if m["split"] == split]
        if not rows:
            continue
        text_rows = [text_row[images[i]["sample_id"]] for i in rows]
        relevant = relevance_matrix([tuple(images[i]["entities"]) for i in rows], cfg.relevance)
        rows, text_rows = np.array(rows), np.array(text_rows)
        rerank = {}
        if reranker is not None:
            image_queries, text_queries = reranker.image_features(rows), reranker.text_features(text_rows)
            rerank = {"rerank_k": reranker.k,
                      "rescore_texts": lambda q, c: reranker.score_texts(image_queries, q, text_rows[c]),
                      "rescore_images": lambda q, c: reranker.score_images(text_queries, q, rows[c])}
        metrics = retrieval_metrics(index.embeddings["images"][rows], index.embeddings["texts"][text_rows],
                                    relevant, cfg.ks, **rerank)
        results[split] = {**metrics, "n": len(rows)}
    return results
