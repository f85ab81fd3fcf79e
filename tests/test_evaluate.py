import numpy as np
import pytest

from entityclip.errors import ConfigError
from entityclip.evaluate import (QueryResults, rank_pairs, rank_queries, recall_at_k, relevance_matrix, sample_scores,
                                 summarize, top_columns)


def test_recall_at_k_counts_queries_with_a_relevant_item_in_the_top_k():
    sim = np.array([[0.9, 0.1, 0.0],   # relevant item ranked 1st
                    [0.8, 0.1, 0.5],   # relevant item (col 1) ranked 3rd
                    [0.1, 0.9, 0.3]])  # relevant item (col 2) ranked 2nd
    assert recall_at_k(sim, np.eye(3, dtype=bool), [1, 2, 3]) == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: 100.0}


def test_a_query_with_no_relevant_item_never_counts():
    relevant = np.array([[True, False], [False, False]])
    assert recall_at_k(np.eye(2), relevant, [1, 2]) == {1: 50.0, 2: 50.0}


def test_each_query_keeps_its_first_relevant_rank_its_relevant_count_and_ap10():
    sim = np.array([[0.9, 0.8, 0.7, 0.6],
                    [0.1, 0.2, 0.9, 0.8]])
    relevant = np.array([[False, True, False, True],    # relevant at ranks 2 and 4
                         [True, False, False, False]])  # relevant at rank 4
    ranked = rank_queries(sim, relevant)
    assert ranked.rank.tolist() == [2, 4]
    assert ranked.relevant.tolist() == [2, 1]
    # AP@10 = mean over relevant items of the precision at their rank: (1/2 + 2/4) / 2, then 1/4.
    assert ranked.ap.tolist() == pytest.approx([0.5, 0.25])


def test_entity_relevance_groups_items_showing_the_same_entities():
    rel = relevance_matrix([("A",), ("A",), ("A", "B"), ("B", "A")], "entities")
    assert rel.tolist() == [[True, True, False, False], [True, True, False, False],
                            [False, False, True, True], [False, False, True, True]]
    assert (relevance_matrix([("A",), ("A",)], "pair") == np.eye(2, dtype=bool)).all()
    with pytest.raises(ConfigError):
        relevance_matrix([("A",)], "bogus")


def test_perfect_and_reversed_embeddings_bound_the_metrics():
    emb = np.eye(4, dtype=np.float32)
    ids = ["a", "b", "c", "d"]
    perfect = summarize(rank_pairs(emb, emb, np.eye(4, dtype=bool), ids), [1, 5])
    assert {k: perfect[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum", "i2t_map10")} == {
        "i2t_r1": 100.0, "i2t_r5": 100.0, "t2i_r1": 100.0, "t2i_r5": 100.0, "rsum": 400.0, "i2t_map10": 100.0}
    assert perfect["rsum_ci_low"] == perfect["rsum_ci_high"] == 400.0  # no spread, no uncertainty
    wrong = summarize(rank_pairs(emb, emb[::-1].copy(), np.eye(4, dtype=bool), ids), [1])
    assert wrong["i2t_r1"] == wrong["t2i_r1"] == 0.0


def test_every_metric_is_the_mean_of_per_sample_scores_and_its_interval_brackets_it():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    results = rank_pairs(images, texts, np.eye(60, dtype=bool), [f"s{i}" for i in range(60)])
    summary = summarize(results, [1, 5, 10])
    scores = sample_scores(results, [1, 5, 10])
    sim = images @ texts.T
    assert summary["i2t_r5"] == pytest.approx(recall_at_k(sim, np.eye(60, dtype=bool), [5])[5])
    assert summary["rsum"] == pytest.approx(sum(summary[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    for metric, per_sample in scores.items():
        assert summary[metric] == pytest.approx(per_sample.mean())
        assert summary[f"{metric}_ci_low"] <= summary[metric] <= summary[f"{metric}_ci_high"]
    assert summary["rsum_ci_high"] - summary["rsum_ci_low"] > 10  # 60 random queries: wide, not a point
    assert summary["n"] == 60


def test_per_query_results_survive_a_table_round_trip():
    rng = np.random.default_rng(1)
    results = rank_pairs(rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), np.eye(5, dtype=bool), list("abcde"))
    table = results.to_table("test_unseen")
    assert table.column("evaluation").to_pylist() == ["test_unseen"] * 5
    back = QueryResults.from_table(table)
    assert back.sample_ids == list("abcde")
    assert back.i2t.rank.tolist() == results.i2t.rank.tolist() and back.t2i.ap.tolist() == results.t2i.ap.tolist()


def ranks_by_full_sort(similarity: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The specification: sort each row (descending, ties by column) and read the ranks off."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    rank = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, similarity.shape[1] + 1)
    return rank, order[:, :10]


@pytest.mark.parametrize("scores", ["continuous", "few values", "identity"])
def test_ranks_and_top_10_equal_a_full_stable_sort_even_with_ties(scores):
    rng = np.random.default_rng(1)
    for _ in range(100):
        q, n = rng.integers(1, 25), rng.integers(1, 40)
        similarity = {"continuous": rng.standard_normal((q, n)), "few values": rng.integers(0, 3, (q, n)).astype(float),
                      "identity": np.eye(q, n)}[scores]
        relevant = rng.random((q, n)) < rng.choice([0.0, 0.05, 0.3])
        rank, top = ranks_by_full_sort(similarity, relevant)
        assert rank_queries(similarity, relevant).rank.tolist() == rank.tolist()
        assert top_columns(similarity, min(10, n)).tolist() == top.tolist()


def test_a_compositional_pair_counts_only_its_own_image_as_relevant_though_both_show_the_same_entities():
    import pyarrow as pa

    from entityclip import vector_index
    from entityclip.config import EvalConfig, IndexConfig
    from entityclip.evaluate import evaluate_index, summarize
    from entityclip.index import EmbeddingIndex

    # Two minimal pairs; every text lies closest to its pair's other image (the composition missed).
    images = np.eye(4, dtype=np.float32)
    texts = images[[1, 0, 3, 2]]
    meta = {"sample_id": ["r0", "r1", "b0", "b1"], "image_uri": [""] * 4, "text": ["t"] * 4,
            "entities": [["A", "B"], ["B", "A"], ["C", "D"], ["C", "D"]]}
    tables, searchers = {}, {}
    for kind, emb in (("images", images), ("texts", texts)):
        tables[kind] = pa.table({**meta, "split": ["test_compositional"] * 4,
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 4)})
        searchers[kind] = vector_index.build_faiss(emb, IndexConfig())
    index = EmbeddingIndex(tables, searchers)
    cfg = EvalConfig(relevance="entities", splits=["test_compositional"])
    result = summarize(evaluate_index(index, cfg)["test_compositional"], [1])
    assert result["t2i_r1"] == 0.0 and result["i2t_r1"] == 0.0  # entity relevance would count all four


def test_composed_queries_are_scored_by_their_own_target_and_never_re_ranked():
    import pyarrow as pa

    from entityclip import vector_index
    from entityclip.config import EvalConfig, IndexConfig
    from entityclip.evaluate import evaluate_index
    from entityclip.index import EmbeddingIndex

    class AnyReranker:  # a re-ranker: the composed split must not reach it
        k = 3

        def image_features(self, rows):
            return rows

        text_features = image_features

        def score_texts(self, queries, rows, columns, similarities):
            return np.asarray(similarities)

        score_images = score_texts

    # Three targets; the stored composed queries lie on them, the texts (here a caption unrelated
    # to any target) are not what a composed query is scored with.
    images = np.eye(3, dtype=np.float32)
    meta = {"sample_id": ["c0", "c1", "c2"], "image_uri": [""] * 3, "text": ["t"] * 3, "entities": [[], [], []],
            "split": ["test_composed"] * 3}
    embeddings = {"images": images, "texts": images[[1, 2, 0]], "composed": images}
    tables = {kind: pa.table({**meta, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1)), 3)})
              for kind, e in embeddings.items()}
    index = EmbeddingIndex(tables, {kind: vector_index.build_faiss(e, IndexConfig()) for kind, e in embeddings.items()})
    cfg = EvalConfig(splits=["test_composed"])
    results = evaluate_index(index, cfg)["test_composed"]
    assert results.t2i.rank.tolist() == [1, 1, 1]  # the composed queries, not the texts
    assert results.t2i.relevant.tolist() == [1, 1, 1]  # no entities: only the query's own target counts
    assert "test_composed" not in evaluate_index(index, cfg, AnyReranker())


def test_a_minimal_pair_query_wins_when_its_own_item_outscores_its_partners():
    from entityclip.evaluate import partner_rows, summarize

    # Rows 0/1 and 2/3 are minimal pairs. Image 0 prefers its own text, image 1 its partner's;
    # texts: 0 and 1 tie on their two images (no win), 2 and 3 each prefer their own.
    images = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    texts = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    ids = ["comp-relation-000-0", "comp-relation-000-1", "comp-binding-000-0", "comp-binding-000-1"]
    partners = partner_rows(ids)
    assert partners.tolist() == [1, 0, 3, 2]
    results = rank_pairs(images, texts, np.eye(4, dtype=bool), ids, partners=partners)
    assert results.i2t.beats_partner.tolist() == [0.0, 0.0, 1.0, 1.0]  # image 0: its own text ties its partner's
    assert results.t2i.beats_partner.tolist() == [1.0, 0.0, 1.0, 1.0]
    summary = summarize(results, [1])
    assert summary["i2t_pair"] == 50.0 and summary["t2i_pair"] == 75.0
    back = QueryResults.from_table(results.to_table("test_compositional"))
    assert back.t2i.beats_partner.tolist() == results.t2i.beats_partner.tolist()


def test_only_complete_minimal_pairs_have_partners():
    from entityclip.data.samples import minimal_pair_partner
    from entityclip.evaluate import partner_rows

    assert minimal_pair_partner("comp-binding-007-1") == "comp-binding-007-0"
    assert minimal_pair_partner("e0001-003") is None
    assert partner_rows(["comp-relation-000-0"]) is None  # its partner is not among the queries
    assert partner_rows(["e0001-000", "e0002-000"]) is None
    plain = rank_pairs(np.eye(2), np.eye(2), np.eye(2, dtype=bool), ["a", "b"])
    assert plain.i2t.beats_partner is None and "i2t_pair" not in summarize(plain, [1])
    assert QueryResults.from_table(plain.to_table("test_seen")).i2t.beats_partner is None
