"""FAISS inner-product search over unit-norm embeddings, saved and loaded through storage.

`index.kind` picks the structure: `flat` (exact, the default: galleries here are small), `ivf`
(inverted lists, `ivf_nlist` cells, `ivf_nprobe` searched) or `hnsw` (graph, `hnsw_m` links,
`hnsw_ef_search` candidates). Approximate kinds trade recall for latency on large galleries;
`benchmarks/index_search.py` measures both against the exact index.
"""

from __future__ import annotations

import faiss
import numpy as np

from entityclip import storage
from entityclip.config import IndexConfig
from entityclip.errors import ConfigError, StorageError

KINDS = ("flat", "ivf", "hnsw")


def build_faiss(embeddings: np.ndarray, index_cfg: IndexConfig) -> faiss.Index:
    """A trained, filled index of `index_cfg.kind` over float32 [N, D] embeddings."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    if index_cfg.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_cfg.kind == "ivf":
        # FAISS wants ~39 training points per cell; a small gallery gets fewer cells, not an error.
        nlist = max(1, min(index_cfg.ivf_nlist, n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(index_cfg.ivf_nprobe, nlist)
    elif index_cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, index_cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = index_cfg.hnsw_ef_construction
        index.hnsw.efSearch = index_cfg.hnsw_ef_search
    else:
        raise ConfigError(f"unknown index.kind {index_cfg.kind!r}; choose one of {list(KINDS)}")
    index.add(x)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each [Q, min(k, N)]; the best first."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    scores, ids = index.search(q, min(k, index.ntotal))
    return scores, ids


def save(index: faiss.Index, uri: str) -> None:
    storage.write_bytes(uri, faiss.serialize_index(index).tobytes())


def load(uri: str) -> faiss.Index:
    data = storage.read_bytes(uri)
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise StorageError(f"{uri}: not a FAISS index ({str(exc).splitlines()[0]})") from None
