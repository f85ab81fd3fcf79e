"""Training shards: every sample with its encoded image bytes, in Parquet files per split.

The data stage writes them with Ray Data (each image read from storage once and checked to
decode, so a corrupt image stops the data stage naming its sample); training streams them back
as a Ray Data dataset, so no process ever holds the whole set. Layout under `data/shards`:

    <write-id>/split=<split>/*.parquet   sample_id, image_uri, text, entities, source, image (bytes),
                                         reference_image (bytes; composed queries only, else null)
    manifest.json                        the current write-id, and per split its files and rows

The manifest is written last and names its files (relative to the shards folder, so a run root
can be moved or copied), so a reader never sees a half-written set: a crash mid-write leaves the
previous manifest (or none) in place.
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa

from entityclip import storage
from entityclip.data.images import decode_image
from entityclip.data.samples import ADDED_SPLITS
from entityclip.errors import InputError, StorageError

MANIFEST = "manifest.json"


def _checked_bytes(sample_id: str, uri: str) -> bytes:
    data = storage.read_bytes(uri)
    try:
        decode_image(data)
    except InputError as exc:
        raise InputError(f"sample {sample_id}: {uri}: {exc}") from None
    return data


def _with_image_bytes(batch: pa.Table) -> pa.Table:
    ids = batch["sample_id"].to_pylist()
    images = [_checked_bytes(i, uri) for i, uri in zip(ids, batch["image_uri"].to_pylist())]
    references = batch["reference_uri"].to_pylist() if "reference_uri" in batch.column_names else [None] * len(ids)
    batch = batch.append_column("image", pa.array(images, pa.binary()))
    return batch.append_column("reference_image", pa.array(
        [None if uri is None else _checked_bytes(i, uri) for i, uri in zip(ids, references)], pa.binary()))


def write_shards(samples_uri: str, shards_uri: str, rows_per_file: int, seed: int = 0) -> dict:
    """Write the samples table's rows with their image bytes as shards; returns the manifest.

    Rows go in a random order: datasets list samples by entity or source, and training reads
    shards block by block, so a block of neighbours would fill a batch with the same entity.
    The rows of splits added later (samples.ADDED_SPLITS) are left out of the shuffle and go
    last: the order of every other split, and so every training run, is what it was before
    those splits existed."""
    import ray

    write_id = uuid.uuid4().hex[:12]
    fs, base = storage.arrow_fs(storage.join(shards_uri, write_id))
    samples = storage.read_parquet(samples_uri)
    added = np.flatnonzero(np.isin(np.asarray(samples.column("split").to_pylist()), ADDED_SPLITS))
    others = np.setdiff1d(np.arange(samples.num_rows), added)
    samples = samples.take(np.concatenate([others[np.random.default_rng(seed).permutation(len(others))], added]))
    # One input block per shard: Ray's Parquet writer holds all of a write task's blocks at once,
    # so a single block of every row would hold every image in one worker.
    blocks = [samples.slice(start, rows_per_file) for start in range(0, samples.num_rows, rows_per_file)]
    (ray.data.from_arrow(blocks)
        .map_batches(_with_image_bytes, batch_format="pyarrow", batch_size=rows_per_file)
        .write_parquet(base, filesystem=fs, partition_cols=["split"]))
    splits: dict[str, dict] = {}
    for uri in storage.list_uris(storage.join(shards_uri, write_id)):
        if not uri.endswith(".parquet"):  # e.g. the empty "directory" objects pyarrow puts on S3
            continue
        relative = uri[len(shards_uri.rstrip("/")) + 1:]
        split = relative.split("/split=", 1)[1].split("/", 1)[0]
        entry = splits.setdefault(split, {"files": [], "rows": 0})
        entry["files"].append(relative)
        entry["rows"] += storage.parquet_rows(uri)
    previous = read_manifest(shards_uri) if storage.exists(storage.join(shards_uri, MANIFEST)) else None
    manifest = {"write_id": write_id, "splits": splits}
    storage.write_json(storage.join(shards_uri, MANIFEST), manifest)
    if previous:  # only now is the old set unreferenced
        for uri in storage.list_uris(storage.join(shards_uri, previous["write_id"])):
            storage.delete(uri)
    return manifest


def read_manifest(shards_uri: str) -> dict:
    uri = storage.join(shards_uri, MANIFEST)
    if not storage.exists(uri):
        raise StorageError(f"{uri} does not exist: run `entityclip data` first")
    return storage.read_json(uri)


def split_rows(shards_uri: str, split: str) -> int:
    return read_manifest(shards_uri)["splits"].get(split, {}).get("rows", 0)


def read_split(shards_uri: str, split: str):
    """The split's shards as a lazy Ray Data dataset (read as it is consumed)."""
    import ray

    entry = read_manifest(shards_uri)["splits"].get(split)
    if not entry or not entry["rows"]:
        raise InputError(f"{shards_uri} holds no {split!r} samples")
    fs, _ = storage.arrow_fs(shards_uri)
    paths = [storage.arrow_fs(storage.join(shards_uri, relative))[1] for relative in entry["files"]]
    return ray.data.read_parquet(paths, filesystem=fs)
