import numpy as np
import pytest

from entityclip.errors import ConfigError
from entityclip.evaluate import recall_at_k, relevance_matrix, retrieval_metrics


def test_recall_at_k_counts_queries_with_a_relevant_item_in_the_top_k():
    sim = np.array([[0.9, 0.1, 0.0],   # relevant item ranked 1st
                    [0.8, 0.1, 0.5],   # relevant item (col 1) ranked 3rd
                    [0.1, 0.9, 0.3]])  # relevant item (col 2) ranked 2nd
    assert recall_at_k(sim, np.eye(3, dtype=bool), [1, 2, 3]) == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: 100.0}


def test_a_query_with_no_relevant_item_never_counts():
    relevant = np.array([[True, False], [False, False]])
    assert recall_at_k(np.eye(2), relevant, [1, 2]) == {1: 50.0, 2: 50.0}


def test_entity_relevance_groups_items_showing_the_same_entities():
    rel = relevance_matrix([("A",), ("A",), ("A", "B"), ("B", "A")], "entities")
    assert rel.tolist() == [[True, True, False, False], [True, True, False, False],
                            [False, False, True, True], [False, False, True, True]]
    assert (relevance_matrix([("A",), ("A",)], "pair") == np.eye(2, dtype=bool)).all()
    with pytest.raises(ConfigError):
        relevance_matrix([("A",)], "bogus")


def test_perfect_and_reversed_embeddings_bound_the_metrics():
    emb = np.eye(4, dtype=np.float32)
    perfect = retrieval_metrics(emb, emb, np.eye(4, dtype=bool), [1, 5])
    assert perfect == {"i2t_r1": 100.0, "i2t_r5": 100.0, "t2i_r1": 100.0, "t2i_r5": 100.0, "rsum": 400.0}
    wrong = retrieval_metrics(emb, emb[::-1].copy(), np.eye(4, dtype=bool), [1])
    assert wrong["i2t_r1"] == wrong["t2i_r1"] == 0.0
