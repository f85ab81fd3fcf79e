"""FAISS inner-product search over unit-norm embeddings, saved and loaded through storage.

`index.kind` picks the structure: `flat` (exact), `ivf` (inverted lists, `ivf_nlist` cells,
`ivf_nprobe` searched), `hnsw` (graph, `hnsw_m` links, `hnsw_ef_search` candidates) or `auto`
(the default): flat up to `index.auto_exact_max` items, ivf above, where an exact scan of one
query costs milliseconds. `benchmarks/index_search.py` measured the choice on a clustered
million-vector gallery (docs/scale.md).
"""

from __future__ import annotations

import faiss
import numpy as np

from entityclip import storage
from entityclip.config import IndexConfig
from entityclip.errors import ConfigError, StorageError

KINDS = ("auto", "flat", "ivf", "hnsw")


def kind_for(n: int, index_cfg: IndexConfig) -> str:
    """The structure an index of `n` items gets: `index.kind`, with auto resolved by size."""
    if index_cfg.kind != "auto":
        return index_cfg.kind
    return "flat" if n <= index_cfg.auto_exact_max else "ivf"


def build_faiss(embeddings: np.ndarray, index_cfg: IndexConfig) -> faiss.Index:
    """A trained, filled index of `index_cfg.kind` over float32 [N, D] embeddings."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    kind = kind_for(n, index_cfg)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        # FAISS wants ~39 training points per cell; a small gallery gets fewer cells, not an error.
        nlist = max(1, min(index_cfg.ivf_nlist, n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(index_cfg.ivf_nprobe, nlist)
    elif kind == "hnsw":
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
