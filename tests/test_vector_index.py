"""FAISS vector index: exact for small galleries, approximate kinds close to it, saved through storage."""

import faiss
import numpy as np
import pytest

from entityclip import vector_index
from entityclip.config import IndexConfig
from entityclip.errors import ConfigError, StorageError


def unit_vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_top_k(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ gallery.T), axis=1)[:, :k]


def test_flat_index_returns_exactly_the_brute_force_top_k():
    gallery, queries = unit_vectors(500), unit_vectors(20, seed=1)
    scores, ids = vector_index.search(vector_index.build_faiss(gallery, IndexConfig()), queries, 10)
    assert (ids == numpy_top_k(gallery, queries, 10)).all()
    assert np.allclose(scores, np.take_along_axis(queries @ gallery.T, ids, axis=1), atol=1e-5)


@pytest.mark.parametrize("cfg", [IndexConfig(kind="ivf", ivf_nlist=16, ivf_nprobe=8),
                                 IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_search=64)])
def test_approximate_indexes_find_most_of_the_exact_top_10(cfg):
    gallery, queries = unit_vectors(4000), unit_vectors(50, seed=1)
    _, ids = vector_index.search(vector_index.build_faiss(gallery, cfg), queries, 10)
    exact = numpy_top_k(gallery, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall >= 0.8, recall


def test_k_larger_than_the_gallery_returns_the_whole_gallery():
    _, ids = vector_index.search(vector_index.build_faiss(unit_vectors(5), IndexConfig()), unit_vectors(1), 50)
    assert sorted(ids[0]) == [0, 1, 2, 3, 4]


def test_an_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown index.kind 'annoy'"):
        vector_index.build_faiss(unit_vectors(5), IndexConfig(kind="annoy"))


def test_an_index_survives_a_round_trip_through_local_storage_and_s3(tmp_path, s3_bucket):
    gallery, queries = unit_vectors(300), unit_vectors(5, seed=1)
    index = vector_index.build_faiss(gallery, IndexConfig(kind="hnsw"))
    expected = vector_index.search(index, queries, 5)[1]
    for uri in (str(tmp_path / "images.faiss"), f"s3://{s3_bucket}/index/images.faiss"):
        vector_index.save(index, uri)
        assert (vector_index.search(vector_index.load(uri), queries, 5)[1] == expected).all()


def test_a_file_that_is_not_an_index_is_a_storage_error(tmp_path):
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(StorageError, match="not a FAISS index"):
        vector_index.load(str(tmp_path / "bad.faiss"))


def test_auto_searches_small_galleries_exactly_and_large_ones_through_inverted_lists():
    auto = IndexConfig(kind="auto", auto_exact_max=100)
    assert isinstance(vector_index.build_faiss(unit_vectors(100), auto), faiss.IndexFlatIP)
    assert isinstance(vector_index.build_faiss(unit_vectors(4000), auto), faiss.IndexIVFFlat)
    assert vector_index.kind_for(10**9, IndexConfig(kind="ivf")) == "ivf"  # a chosen kind stays chosen
