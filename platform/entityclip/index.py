"""The embedding index: Ray Data batch-embeds every image and every text(+explanation) with a
checkpoint, and `EmbeddingIndex` searches them with FAISS (inner product of unit vectors). A
composed query (a sample with a reference image) is not a text of the gallery: its embedding,
its reference image and text together (`EntityCLIP.composed_embedding`), goes in a third kind,
`composed`, which the evaluator reads and no search returns.

Layout under the index URI, per kind (images, texts, composed where the data has composed
queries): `<kind>.parquet` with sample_id,
image_uri, text, entities, split and a fixed-size `embedding` column, and `<kind>.faiss`, the
serialized FAISS index over the same rows (structure from `index.kind`, vector_index.py). An
index is published atomically as one version folder (publish.py): these files sit in it.
For a model with a re-ranker (rerank.py), or with `index.image_tokens`, `images.tokens.npy` also holds every image's token
features [N, T, D] in float16, row-aligned with images.parquet: the re-ranker reads the gallery's
candidates from it instead of decoding and encoding their images again. It costs N × T × D × 2
bytes (65 tokens × 64 dims = 8 KB an image at the default size; 50 × 512 = 51 KB for ViT-B-32).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from entityclip import publish, storage, vector_index
from entityclip.config import IndexConfig
from entityclip.data.images import read_image_tensor
from entityclip.data.pairs import load_pairs
from entityclip.errors import InputError
from entityclip.models.checkpoint import load_model

KINDS = ("images", "texts")  # what searches return
COMPOSED = "composed"  # stored composed queries, for evaluation
TOKENS = "images.tokens.npy"
HIT_COLUMNS = ("sample_id", "image_uri", "text", "split")


class Embedder:
    """Ray Data callable class: loads the checkpoint once per actor, embeds batches."""

    def __init__(self, checkpoint_uri: str, kind: str, keep_tokens: bool = False):
        torch.set_num_threads(1)
        self.model = load_model(checkpoint_uri)
        self.kind = kind
        self.keep_tokens = keep_tokens or self.model.reranker is not None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind == "images":
            images = torch.stack([read_image_tensor(u, self.model.image_size) for u in batch["image_uri"]])
            with torch.no_grad():
                features = self.model.encode_images(images)
                emb = self.model.image_embedding(features, list(batch["boxes"]))
            if self.keep_tokens:
                batch = {**batch, "tokens": features.tokens.numpy().astype(np.float16)}
        elif self.kind == COMPOSED:
            references = torch.stack([read_image_tensor(u, self.model.image_size) for u in batch["reference_uri"]])
            emb = self.model.embed_composed(references, list(batch["text"]), list(batch["explanation"]))
        else:
            emb = self.model.embed_texts(list(batch["text"]), list(batch["explanation"]))
        return {**batch, "embedding": emb.numpy().astype(np.float32)}


@dataclass
class IndexStats:
    uri: str
    items: int
    dim: int


def build_index(checkpoint_uri: str, samples_uri: str, explanations_uri: str, out_uri: str,
                index_cfg: IndexConfig) -> IndexStats:
    rows = [{"sample_id": p.sample_id, "image_uri": p.image_uri, "text": p.text, "explanation": p.explanation,
             "entities": list(p.entities), "split": p.split, "boxes": [list(b) for b in p.boxes],
             "reference_uri": p.reference_uri or ""}
            for p in load_pairs(samples_uri, explanations_uri)]
    rows_of = {"images": rows, "texts": [r for r in rows if not r["reference_uri"]],
               COMPOSED: [r for r in rows if r["reference_uri"]]}
    tables, tokens = {}, None
    for kind in (*KINDS, COMPOSED):
        if kind == COMPOSED and not rows_of[kind]:
            continue
        ds = ray.data.from_items(rows_of[kind]).map_batches(
            Embedder, fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "kind": kind,
                                             "keep_tokens": index_cfg.image_tokens},
            batch_size=index_cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=index_cfg.num_actors),
            batch_format="numpy")
        items = ds.take_all()
        if items and "tokens" in items[0]:
            tokens = np.stack([item.pop("tokens") for item in items])
        tables[kind] = pa.Table.from_pylist(items)
    write_index(out_uri, tables, index_cfg, tokens)
    return IndexStats(out_uri, len(rows), len(tables["images"]["embedding"][0].as_py()) if rows else 0)


def write_index(uri: str, tables: dict[str, pa.Table], index_cfg: IndexConfig, tokens: np.ndarray | None = None) -> None:
    """Publish a gallery index (publish.py): per kind, its rows with a fixed-size `embedding`
    column and a FAISS index over them; the re-ranker's image tokens where given. Readers see the
    previous index until every file of this one is written."""
    with publish.publishing(uri) as version:
        for kind, table in tables.items():
            embeddings = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
            table = table.drop_columns(["embedding"]).append_column(
                "embedding", pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1]))
            storage.write_parquet(storage.join(version, f"{kind}.parquet"), table)
            vector_index.save(vector_index.build_faiss(embeddings, index_cfg), storage.join(version, f"{kind}.faiss"))
        if tokens is not None:
            storage.write_bytes(storage.join(version, TOKENS), _npy_bytes(tokens))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class Hit:
    sample_id: str
    score: float  # the first stage's similarity
    image_uri: str
    text: str
    split: str
    rerank_score: float | None = None  # the re-ranker's score, for the candidates it re-ranked

    def answer(self) -> dict:
        """What a search answers with: no storage location (the gallery image is served by id)."""
        return {"sample_id": self.sample_id, "score": self.score, "text": self.text, "split": self.split,
                "rerank_score": self.rerank_score}


class RowMeta:
    """An index's row metadata (sample_id, image_uri, text, ...), kept columnar in Arrow: a
    million-row gallery costs its Arrow buffers, not a million Python dicts (1.25 KB each, measured)."""

    def __init__(self, table: pa.Table):
        self.table = table.combine_chunks()
        self._columns: dict[str, list] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, row: int) -> dict:
        return self.row(row, self.table.column_names)

    def row(self, row: int, names: tuple[str, ...] | list[str]) -> dict:
        """The named columns of one row."""
        return {name: self.table.column(name)[int(row)].as_py() for name in names}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def column(self, name: str) -> list:
        """One column as a Python list, made on first use (evaluation reads whole columns)."""
        if name not in self._columns:
            self._columns[name] = self.table.column(name).to_pylist()
        return self._columns[name]


class EmbeddingIndex:
    """Row metadata, the embeddings (for evaluation) and one FAISS index per kind. The embeddings
    are a view of the Arrow column, not a copy: a gallery's vectors are held once beside FAISS."""

    def __init__(self, tables: dict[str, pa.Table], searchers: dict, image_tokens: np.ndarray | None = None):
        self.meta = {k: RowMeta(t.drop_columns(["embedding"])) for k, t in tables.items()}
        self.embeddings = {k: _embedding_view(t) for k, t in tables.items()}
        self.searchers = searchers
        self.image_tokens = image_tokens  # [N, T, D] float16 when kept (a re-ranker reads them)
        self._image_rows: dict[str, int] | None = None  # sample id -> row, built on first use

    @classmethod
    def load(cls, uri: str) -> "EmbeddingIndex":
        uri = publish.current(uri)
        kinds = [*KINDS, *([COMPOSED] if storage.exists(storage.join(uri, f"{COMPOSED}.parquet")) else [])]
        tables = {k: storage.read_parquet(storage.join(uri, f"{k}.parquet")) for k in kinds}
        tokens_uri = storage.join(uri, TOKENS)
        tokens = np.load(io.BytesIO(storage.read_bytes(tokens_uri))) if storage.exists(tokens_uri) else None
        return cls(tables, {k: vector_index.load(storage.join(uri, f"{k}.faiss")) for k in kinds}, tokens)

    def __len__(self) -> int:
        return len(self.meta["images"])

    @property
    def dim(self) -> int:
        return self.embeddings["images"].shape[1]

    def search(self, queries: np.ndarray, kind: str, k: int = 10, rerank=None, rerank_k: int = 0) -> list[list[Hit]]:
        """Top-k items of `kind` ("images" or "texts") for each row of unit-norm [Q, D] queries.
        With `rerank(query_rows, item_rows, first_stage_scores) → scores` (rerank.py), each
        query's first `rerank_k` candidates are re-scored and put first, best first."""
        if kind not in KINDS:
            raise InputError(f"unknown index kind {kind!r}")
        scores, ids = vector_index.search(self.searchers[kind], queries, max(k, rerank_k) if rerank else k)
        rescored = np.full(ids.shape, np.nan)
        if rerank:
            # FAISS pads with id -1 when an approximate index finds fewer items than asked.
            rows, cols = np.nonzero(ids[:, :rerank_k] >= 0)
            if len(rows):
                rescored[rows, cols] = rerank(rows, ids[rows, cols], scores[rows, cols])
            order = rerank_order(rescored)
            scores, ids, rescored = (np.take_along_axis(a, order, axis=1) for a in (scores, ids, rescored))
        meta = self.meta[kind]

        def hit(i: int, score: float, rescore: float) -> Hit:
            m = meta.row(i, HIT_COLUMNS)
            return Hit(m["sample_id"], float(score), m["image_uri"], m["text"], m["split"],
                       None if np.isnan(rescore) else float(rescore))

        return [[hit(i, s, r) for s, i, r in zip(row_scores, row_ids, row_rescored) if i >= 0][:k]
                for row_scores, row_ids, row_rescored in zip(scores, ids, rescored)]

    def image_uri(self, sample_id: str) -> str | None:
        """Where a gallery image is stored, by its sample id (the lookup is built on first use)."""
        if self._image_rows is None:  # not through column(): that would keep the ids twice
            ids = self.meta["images"].table.column("sample_id").to_pylist()
            self._image_rows = {sid: i for i, sid in enumerate(ids)}
        row = self._image_rows.get(sample_id)
        return None if row is None else self.meta["images"].table.column("image_uri")[row].as_py()


def _embedding_view(table: pa.Table) -> np.ndarray:
    """[N, D] float32 over the table's fixed-size `embedding` column, without copying it."""
    column = table.column("embedding").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(table.num_rows, -1)


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """[Q, K] column order that sorts each row's re-ranked candidates by descending score; NaN
    (not re-ranked) columns keep their order after them."""
    return np.argsort(np.where(np.isnan(scores), np.inf, -scores), axis=1, kind="stable")
