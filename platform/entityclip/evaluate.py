"""Recall@K and mAP@10 in both directions from an embedding index, per test split, with 95%
bootstrap intervals; with a re-ranker (rerank.py), of the two-stage retrieval it serves.

Every figure is a mean over the split's samples of a per-sample score (`sample_scores`), and
each sample's result is kept (`QueryResults`: the rank of its first relevant item and its
count of relevant items, for its image query and its text query), so that two models can be
compared query by query (stats.py) long after the evaluation ran.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from entityclip.config import EvalConfig
from entityclip.data.samples import COMPOSED_SPLIT, PAIR_RELEVANCE_SPLITS, minimal_pair_partner
from entityclip.errors import ConfigError
from entityclip.index import COMPOSED, EmbeddingIndex, rerank_order
from entityclip.stats import bootstrap_ci

MAP_AT = 10  # mAP@10: with several relevant items per query it varies less than R@1
DIRECTIONS = ("i2t", "t2i")


@dataclass(frozen=True)
class RankedQueries:
    """One direction's queries: each one's 1-based rank of its first relevant item (gallery
    size + 1 when it has none), its number of relevant items and its AP@10 in [0, 1]; for
    minimal pairs (the compositional split), whether its own item ranked above its pair
    partner's (1.0 or 0.0: Winoground's text and image scores, where a bag of words gets 50%)."""
    rank: np.ndarray
    relevant: np.ndarray
    ap: np.ndarray
    beats_partner: np.ndarray | None = None


def rank_queries(similarity: np.ndarray, relevant: np.ndarray) -> RankedQueries:
    """Rows are queries, columns the gallery; `relevant` [Q, N] boolean. Items rank by
    descending similarity, ties by column. Linear in the gallery: only each row's first
    relevant item and its top MAP_AT are placed, never the whole row sorted."""
    q, n = similarity.shape
    columns = np.arange(n)
    n_relevant = relevant.sum(axis=1)
    # The first relevant item: the best-scoring relevant column, the lowest one among ties.
    best = np.where(relevant, similarity, -np.inf).max(axis=1, initial=-np.inf)
    first = np.argmax(relevant & (similarity == best[:, None]), axis=1)
    ahead = (similarity > best[:, None]).sum(axis=1) + ((similarity == best[:, None]) & (columns < first[:, None])).sum(axis=1)
    rank = np.where(n_relevant > 0, ahead + 1, n + 1)
    top = np.take_along_axis(relevant, top_columns(similarity, min(MAP_AT, n)), axis=1).astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision * top).sum(axis=1) / np.maximum(1, np.minimum(n_relevant, MAP_AT))
    return RankedQueries(rank.astype(np.int64), n_relevant.astype(np.int64), ap)


def top_columns(similarity: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] each row's k best columns in rank order (descending similarity, ties by column),
    as a stable sort of the whole row would give them, in O(N) per row."""
    if k == 0:
        return np.zeros((similarity.shape[0], 0), dtype=np.int64)
    kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]  # each row's k-th best score
    above, tied = similarity > kth[:, None], similarity == kth[:, None]
    # Every column above the k-th score, then tied ones by column until the row has k.
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= (k - above.sum(axis=1))[:, None]))
    cols = np.nonzero(chosen)[1].reshape(-1, k)  # ascending column order within each row
    order = np.argsort(-np.take_along_axis(similarity, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Percentage of queries (rows) with at least one relevant item among their top k columns."""
    rank = rank_queries(similarity, relevant).rank
    return {k: float(100.0 * np.mean(rank <= k)) for k in ks}


@dataclass(frozen=True)
class QueryResults:
    """One evaluation's per-sample results: sample i is both image query i (i2t) and text query
    i (t2i)."""
    sample_ids: list[str]
    i2t: RankedQueries
    t2i: RankedQueries

    def to_table(self, evaluation: str) -> pa.Table:
        """One row per sample; `<direction>_beats_partner` is null outside minimal pairs (the
        table holds every evaluation of a model)."""
        columns = {"evaluation": [evaluation] * len(self.sample_ids), "sample_id": self.sample_ids}
        for direction in DIRECTIONS:
            ranked = getattr(self, direction)
            beats = ranked.beats_partner
            columns |= {f"{direction}_rank": ranked.rank, f"{direction}_relevant": ranked.relevant,
                        f"{direction}_ap10": ranked.ap,
                        f"{direction}_beats_partner": pa.array(beats if beats is not None else [None] * len(ranked.rank),
                                                               pa.float64())}
        return pa.table(columns)

    @classmethod
    def from_table(cls, table: pa.Table) -> "QueryResults":
        col = {name: table[name] for name in table.column_names if name not in ("evaluation", "sample_id")}

        def ranked(d: str) -> RankedQueries:
            beats = col.get(f"{d}_beats_partner")  # tables written before minimal pairs have none
            return RankedQueries(col[f"{d}_rank"].to_numpy(), col[f"{d}_relevant"].to_numpy(), col[f"{d}_ap10"].to_numpy(),
                                 None if beats is None or beats.null_count else beats.to_numpy())

        return cls(table["sample_id"].to_pylist(), *(ranked(d) for d in DIRECTIONS))


def sample_scores(results: QueryResults, ks: list[int]) -> dict[str, np.ndarray]:
    """{metric: [N] per-sample score}; each metric is the mean of its scores. Recalls are 0 or
    100, mAP@10 is 100 x AP@10, and rsum is the sum of the sample's six recalls."""
    scores = {}
    for direction in DIRECTIONS:
        ranked = getattr(results, direction)
        scores |= {f"{direction}_r{k}": 100.0 * (ranked.rank <= k) for k in ks}
    scores["rsum"] = sum(scores.values())
    for direction in DIRECTIONS:
        scores[f"{direction}_map{MAP_AT}"] = 100.0 * getattr(results, direction).ap
        if getattr(results, direction).beats_partner is not None:
            scores[f"{direction}_pair"] = 100.0 * getattr(results, direction).beats_partner
    return scores


def summarize(results: QueryResults, ks: list[int]) -> dict[str, float]:
    """Each metric, its 95% bootstrap interval over samples (`<metric>_ci_low/_ci_high`) and n."""
    scores = sample_scores(results, ks)
    names = list(scores)
    matrix = np.stack([scores[m] for m in names], axis=1)
    low, high = bootstrap_ci(matrix)
    out = {m: float(v) for m, v in zip(names, matrix.mean(axis=0))}
    out |= {f"{m}_ci_low": float(v) for m, v in zip(names, low)}
    out |= {f"{m}_ci_high": float(v) for m, v in zip(names, high)}
    return {**out, "n": len(results.sample_ids)}


def relevance_matrix(entities: list[tuple[str, ...]], mode: str) -> np.ndarray:
    """[N, N] boolean: pair = the diagonal; entities = items showing the same set of entities."""
    n = len(entities)
    if mode == "pair":
        return np.eye(n, dtype=bool)
    if mode == "entities":
        ids: dict[frozenset, int] = {}
        keys = np.array([ids.setdefault(frozenset(e), len(ids)) for e in entities])
        return (keys[:, None] == keys[None, :]) | np.eye(n, dtype=bool)
    raise ConfigError(f"unknown evaluate.relevance {mode!r}; choose pair or entities")


def rerank_similarity(similarity: np.ndarray, k: int, rescore) -> np.ndarray:
    """`similarity` [Q, N] with each row's top-k columns re-scored by `rescore(query_rows,
    columns, their similarities)` → scores and lifted above every other column in that order: argsorting the result
    ranks items as two-stage retrieval does."""
    k = min(k, similarity.shape[1])
    top = top_columns(similarity, k)
    rows = np.repeat(np.arange(similarity.shape[0]), k)
    columns = top.reshape(-1)
    scores = np.asarray(rescore(rows, columns, similarity[rows, columns]), dtype=np.float64).reshape(top.shape)
    reordered = np.take_along_axis(top, rerank_order(scores), axis=1)
    out = similarity.astype(np.float64, copy=True)
    out[rows.reshape(top.shape), reordered] = out.max() + 1 + np.arange(k, 0, -1)
    return out


def rank_pairs(image_emb: np.ndarray, text_emb: np.ndarray, relevant: np.ndarray, sample_ids: list[str],
               rerank_k: int = 0, rescore_texts=None, rescore_images=None,
               partners: np.ndarray | None = None) -> QueryResults:
    """Both directions for row-aligned pairs, each side the other's gallery. With `rerank_k`,
    each query's top candidates are re-scored: rescore_texts(image_rows, text_rows, similarities)
    and rescore_images(text_rows, image_rows, similarities), rows local to these arrays. With
    `partners` (row i's minimal-pair partner row), each query also says whether its own item
    ranked above its partner's."""
    sim = image_emb @ text_emb.T
    i2t, t2i = sim, sim.T
    if rerank_k:
        i2t, t2i = rerank_similarity(i2t, rerank_k, rescore_texts), rerank_similarity(t2i, rerank_k, rescore_images)
    return QueryResults(list(sample_ids), *(
        replace(rank_queries(s, r), beats_partner=None if partners is None else beats_partner(s, partners))
        for s, r in ((i2t, relevant), (t2i, relevant.T))))


def beats_partner(similarity: np.ndarray, partners: np.ndarray) -> np.ndarray:
    """[Q] 1.0 where query i's own item (column i) scores above its partner's column, else 0.0
    (a tie is not a win)."""
    rows = np.arange(len(partners))
    return (similarity[rows, rows] > similarity[rows, partners]).astype(np.float64)


def partner_rows(sample_ids: list[str]) -> np.ndarray | None:
    """Each sample's minimal-pair partner row, when every sample has one among them; else None."""
    row = {sample_id: i for i, sample_id in enumerate(sample_ids)}
    partners = [row.get(minimal_pair_partner(s) or "") for s in sample_ids]
    return None if not partners or None in partners else np.array(partners)


def evaluate_index(index: EmbeddingIndex, eval_cfg: EvalConfig, reranker=None) -> dict[str, QueryResults]:
    """{split: its per-sample results}; images and texts of the split form each other's
    gallery (test_composed's texts: its stored composed queries). With a `Reranker`
    (rerank.py), of two-stage retrieval, test_composed left out: a re-ranker scores (image,
    text) pairs, and a composed query is not one."""
    results, text_row = {}, {}  # text_row: per kind, sample id -> row
    images = index.meta["images"]
    image_ids, image_splits, image_entities = images.column("sample_id"), images.column("split"), images.column("entities")
    for split in eval_cfg.splits:
        rows = [i for i, s in enumerate(image_splits) if s == split]
        kind = COMPOSED if split == COMPOSED_SPLIT else "texts"
        if not rows or (kind == COMPOSED and (reranker is not None or COMPOSED not in index.meta)):
            continue
        if kind not in text_row:
            text_row[kind] = {sample_id: i for i, sample_id in enumerate(index.meta[kind].column("sample_id"))}
        text_rows = [text_row[kind][image_ids[i]] for i in rows]
        # A compositional pair's two images show the same entities, and a composed query asks for
        # one target: only its own image is relevant.
        mode = "pair" if split in PAIR_RELEVANCE_SPLITS else eval_cfg.relevance
        relevant = relevance_matrix([tuple(image_entities[i]) for i in rows], mode)
        sample_ids = [image_ids[i] for i in rows]
        rows, text_rows = np.array(rows), np.array(text_rows)
        rerank = {}
        if reranker is not None:
            image_queries, text_queries = reranker.image_features(rows), reranker.text_features(text_rows)
            rerank = {"rerank_k": reranker.k,
                      "rescore_texts": lambda q, c, s: reranker.score_texts(image_queries, q, text_rows[c], s),
                      "rescore_images": lambda q, c, s: reranker.score_images(text_queries, q, rows[c], s)}
        results[split] = rank_pairs(index.embeddings["images"][rows], index.embeddings[kind][text_rows],
                                    relevant, sample_ids, **rerank, partners=partner_rows(sample_ids))
    return results
