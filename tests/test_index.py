"""The gallery index in memory: rows kept as Arrow columns, vectors held once."""

import numpy as np
import pyarrow as pa

from entityclip import vector_index
from entityclip.config import IndexConfig
from entityclip.index import EmbeddingIndex, RowMeta


def gallery(n: int = 50, dim: int = 8) -> EmbeddingIndex:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pa.table({"sample_id": [f"s{i}" for i in range(n)], "image_uri": [f"/g/{i}.png" for i in range(n)],
                      "text": [f"text {i}" for i in range(n)], "split": ["test_seen"] * n,
                      "entities": [[f"E{i % 5}"] for i in range(n)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)})
    searcher = vector_index.build_faiss(vectors, IndexConfig())
    return EmbeddingIndex({"images": table, "texts": table}, {"images": searcher, "texts": searcher})


def test_rows_read_like_dicts_but_stay_columns():
    index = gallery()
    rows = index.meta["images"]
    assert isinstance(rows, RowMeta) and isinstance(rows.table, pa.Table)
    assert rows[7] == {"sample_id": "s7", "image_uri": "/g/7.png", "text": "text 7", "split": "test_seen", "entities": ["E2"]}
    assert rows.row(3, ("sample_id",)) == {"sample_id": "s3"}
    assert rows.column("split") == ["test_seen"] * 50
    assert len(rows) == 50 and [m["sample_id"] for m in rows][:2] == ["s0", "s1"]


def test_embeddings_are_a_view_of_the_arrow_column_not_a_copy():
    index = gallery()
    view = index.embeddings["images"]
    assert view.shape == (50, 8) and view.dtype == np.float32
    assert not view.flags.owndata and not view.flags.writeable


def test_search_hits_and_gallery_lookup_read_the_rows_they_need():
    index = gallery()
    query = index.embeddings["images"][11:12]
    hit = index.search(query, "images", k=3)[0][0]
    assert (hit.sample_id, hit.image_uri, hit.text) == ("s11", "/g/11.png", "text 11")
    assert index.image_uri("s42") == "/g/42.png"
    assert index.image_uri("../etc/passwd") is None
