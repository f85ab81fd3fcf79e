"""Two-stage retrieval: the index's top candidates re-scored and reordered, the same way in the
evaluator and in the Retriever, and only by a re-ranker the model has."""

import numpy as np
import pyarrow as pa
import pytest

from entityclip import vector_index
from entityclip.config import IndexConfig, ModelConfig
from entityclip.errors import ConfigError
from entityclip.evaluate import recall_at_k, rerank_similarity
from entityclip.index import EmbeddingIndex, rerank_order
from entityclip.models import build_model
from entityclip.rerank import Reranker, choose

TINY = dict(image_size=32, patch_size=8, width=32, embed_dim=32, layers=1, heads=2, context_length=32,
            n_vision_experts=1, n_shared_experts=1, n_text_experts=1, fusion_layers=1)


def test_rerank_order_sorts_the_rescored_candidates_and_keeps_the_rest_after_them():
    scores = np.array([[0.1, 0.9, 0.5, np.nan, np.nan]])
    assert rerank_order(scores).tolist() == [[1, 2, 0, 3, 4]]


def test_reranked_similarity_puts_the_top_k_first_in_the_rerankers_order():
    similarity = np.array([[0.9, 0.8, 0.7, 0.1],
                           [0.1, 0.2, 0.3, 0.4]])
    # The re-ranker prefers the first stage's third candidate, then its first; never sees column 3
    # of row 0 (outside the top 3).
    rescore = {(0, 0): 0.5, (0, 1): 0.1, (0, 2): 0.9, (1, 3): 0.0, (1, 2): 0.2, (1, 1): 0.1}
    calls = []

    def score(rows, cols, first_stage):
        assert first_stage.tolist() == similarity[rows, cols].tolist()  # each pair's first-stage score
        calls.extend(zip(rows.tolist(), cols.tolist()))
        return np.array([rescore[p] for p in zip(rows.tolist(), cols.tolist())])

    out = rerank_similarity(similarity, 3, score)
    assert set(calls) == set(rescore)
    assert np.argsort(-out, axis=1).tolist() == [[2, 0, 1, 3], [2, 1, 3, 0]]
    # Recall follows the new order: row 0's relevant item (column 2) is now first.
    relevant = np.array([[False, False, True, False], [True, False, False, False]])
    assert recall_at_k(out, relevant, [1, 4]) == {1: 50.0, 4: 100.0}


def _index(embeddings: np.ndarray, tokens: np.ndarray | None = None) -> EmbeddingIndex:
    n = len(embeddings)
    meta = {"sample_id": [f"s{i}" for i in range(n)], "image_uri": [f"/g/{i}.png" for i in range(n)],
            "text": [f"text {i}" for i in range(n)], "explanation": ["" for _ in range(n)],
            "split": ["test_seen"] * n}
    table = pa.table({**meta, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(embeddings.reshape(-1)), embeddings.shape[1])})
    searcher = vector_index.build_faiss(embeddings, IndexConfig())
    return EmbeddingIndex({"images": table, "texts": table}, {"images": searcher, "texts": searcher}, tokens)


def test_index_search_reranks_only_the_first_rerank_k_candidates():
    gallery = np.eye(6, dtype=np.float32)
    query = np.array([[0.6, 0.5, 0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    query /= np.linalg.norm(query)
    index = _index(gallery)
    seen = []

    def rerank(rows, items, first_stage):  # prefers higher ids
        assert np.allclose(first_stage, query[0, items])  # the first stage's similarities come along
        seen.extend(items.tolist())
        return items.astype(float)

    hits = index.search(query, "images", k=5, rerank=rerank, rerank_k=3)[0]
    assert sorted(seen) == [0, 1, 2]  # the first stage's top 3, nothing else
    assert [h.sample_id for h in hits] == ["s2", "s1", "s0", "s3", "s4"]
    assert [h.rerank_score for h in hits] == [2.0, 1.0, 0.0, None, None]
    first_stage = {h.sample_id: h.score for h in index.search(query, "images", k=6)[0]}
    assert all(h.score == pytest.approx(first_stage[h.sample_id]) for h in hits)  # scores stay the index's
    # k larger than rerank_k: the index is asked for k, and k come back
    assert len(index.search(query, "images", k=2, rerank=rerank, rerank_k=4)[0]) == 2


@pytest.mark.parametrize("variant, auto, allowed", [
    ("entityclip", None, "itm"), ("filip", "late_interaction", "late_interaction"),
    ("xattn_fusion", "xattn_fusion", "xattn_fusion"), ("clip_finetune", None, None)])
def test_auto_runs_the_rerankers_that_define_a_variant_and_others_are_opt_in(variant, auto, allowed):
    model = build_model(ModelConfig(variant=variant, **TINY))
    assert choose(model, "auto") == auto
    assert choose(model, "none") is None
    for name in ("itm", "late_interaction", "xattn_fusion"):
        if name == allowed:
            assert choose(model, name) == name
        else:
            with pytest.raises(ConfigError, match=f"cannot run: {'its re-ranker is' if allowed else 'it has none'}"):
                choose(model, name)


def test_reranking_needs_the_token_features_in_the_index():
    model = build_model(ModelConfig(variant="filip", **TINY))
    with pytest.raises(ConfigError, match="rebuild it with `entityclip index`"):
        Reranker(model, _index(np.eye(3, dtype=np.float32)), "late_interaction", 5)
