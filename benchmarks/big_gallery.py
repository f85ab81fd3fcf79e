"""A gallery of N vectors with the cluster structure of a trained model's own embeddings, as a
run root Serve can serve (for benchmarks/serve_load.py) and as vectors (for index_search.py).

Random unit vectors are the approximate indexes' degenerate case: no clusters, and the true
top 10 are near-ties. Real galleries are many photos of each of many things. So each of the
trained gallery's images becomes a cluster centre, and the new vectors are its neighbours at
the spread the model itself shows: their cosine to the centre is the mean cosine between two
gallery images of the same entity, measured on the run's index (printed).

    .venv/bin/python benchmarks/big_gallery.py --root runs/scale --config configs/scale.yaml
        --out runs/scale-1m [--n 1000000] [--set index.kind=hnsw ...]

The new root links the source root's data, LM, explanations and checkpoints, and holds its own
index (built with the config's `index.*`; its text gallery is the source's).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from entityclip import publish, storage
from entityclip.config import load_config
from entityclip.index import EmbeddingIndex, write_index
from entityclip.paths import RunPaths, model_key


def same_entity_cosine(index: EmbeddingIndex, pairs: int = 20000, seed: int = 0) -> float:
    """Mean cosine between two different gallery images that show the same first entity."""
    by_entity: dict[str, list[int]] = {}
    for row, entities in enumerate(index.meta["images"].column("entities")):
        by_entity.setdefault(entities[0], []).append(row)
    groups = [rows for rows in by_entity.values() if len(rows) > 1]
    rng = np.random.default_rng(seed)
    picks = [rng.choice(groups[g], 2, replace=False) for g in rng.integers(0, len(groups), pairs)]
    a, b = (np.array(x) for x in zip(*picks))
    emb = index.embeddings["images"]
    return float(np.mean(np.sum(emb[a] * emb[b], axis=1)))


def clustered_vectors(centres: np.ndarray, n: int, cosine: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n unit vectors, the centre row of each): centre + Gaussian noise scaled so that the
    expected cosine between two vectors of one cluster is `cosine`, centres taken in turn."""
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    # Two neighbours c + s·g1, c + s·g2 (|g| ≈ 1 in high dimension) have cosine 1 / (1 + s²).
    spread = np.sqrt(max(1.0 / cosine - 1.0, 1e-6))
    parents = np.arange(n) % len(centres)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: one 1M x D float64 temporary would double the memory
        rows = parents[start:start + 100_000]
        noise = rng.standard_normal((len(rows), dim), dtype=np.float32) / np.sqrt(dim)
        x = centres[rows] + spread * noise
        out[start:start + len(rows)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, parents


def grown_images(index: EmbeddingIndex, n: int, cosine: float) -> pa.Table:
    """The gallery's images table grown to n rows: its own rows, then neighbours that borrow
    their parent's metadata (a new sample id, split "synthetic")."""
    own = index.meta["images"].table
    emb = index.embeddings["images"]
    extra, parents = clustered_vectors(emb, n - len(emb), cosine)
    rows = own.take(pa.array(parents))
    rows = rows.set_column(rows.column_names.index("sample_id"), "sample_id",
                           pa.array([f"{sid}~{k}" for k, sid in enumerate(rows.column("sample_id").to_pylist())]))
    rows = rows.set_column(rows.column_names.index("split"), "split", pa.array(["synthetic"] * len(rows)))
    table = pa.concat_tables([own, rows])
    vectors = np.concatenate([emb, extra])
    return table.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]))


def build_root(root: str, out: str, n: int, config: str | None, overrides: list[str]) -> dict:
    cfg = load_config(config, [f"storage.root={root}", *overrides])
    source, target = RunPaths.for_config(cfg), RunPaths.for_config(replace(cfg, storage=replace(cfg.storage, root=out)))
    key = model_key(cfg)
    index = EmbeddingIndex.load(source.index(key))
    cosine = same_entity_cosine(index)
    Path(out).mkdir(parents=True, exist_ok=True)
    for entry in Path(root).iterdir():
        if entry.name not in ("index", "eval", "summary.json") and not (Path(out) / entry.name).exists():
            (Path(out) / entry.name).symlink_to(entry.resolve())
    start = time.perf_counter()
    images = grown_images(index, n, cosine)
    texts = index.meta["texts"].table.append_column("embedding", pa.FixedSizeListArray.from_arrays(
        pa.array(index.embeddings["texts"].reshape(-1)), index.dim))
    write_index(target.index(key), {"images": images, "texts": texts}, cfg.index)
    return {"n": n, "same_entity_cosine": round(cosine, 3), "index_kind": cfg.index.kind,
            "build_s": round(time.perf_counter() - start, 1), "index": publish.current(target.index(key))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="a trained run root (after `entityclip index`)")
    parser.add_argument("--out", required=True, help="the new run root")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--config", default=None, help="the run's config (e.g. configs/scale.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides (index.*)")
    args = parser.parse_args()
    if storage.is_s3(args.root) or storage.is_s3(args.out):
        raise SystemExit("big_gallery.py links local run roots")
    print(build_root(args.root, args.out, args.n, args.config, args.set))


if __name__ == "__main__":
    main()
