"""Ingest RS5M (Zhang et al., "RS5M and GeoRSCLIP", 2023) in its published layout → samples.

RS5M ships as WebDataset tar shards named `<subset>-<split>-<NNNN>.tar` (subset pub11: images
filtered from eleven public datasets; rs3: three remote-sensing datasets; split train or val),
in one folder or in train/ and val/ folders under it. Each sample is three members sharing a
key: `<key>.img_name` (the image's file name), `<key>.img_content` (its encoded bytes) and
`<key>.caption` (UTF-8 text). The images are written out under `<images>/<subset>/` so that
the samples table can point at files like every other source. Captions describe scenes rather
than name entities: `entities` is empty, and an LLM engine finds any in the text.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath

from entityclip import storage
from entityclip.errors import InputError, StorageError

SHARD = re.compile(r"^(pub11|rs3)-(train|val)-(\d+)\.tar$")
FIELDS = ("img_name", "img_content", "caption")


def shard_uris(source: str) -> list[str]:
    """RS5M's shards anywhere under `source` (its folder, or its train/ and val/), in name order."""
    found = [u for u in storage.list_uris(source) if SHARD.match(u.rsplit("/", 1)[-1])]
    if not found:
        raise StorageError(f"{source}: no RS5M shards (<pub11|rs3>-<train|val>-NNNN.tar) here or below")
    return sorted(found, key=lambda u: u.rsplit("/", 1)[-1])


def read_shard(uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {img_name, img_content, caption} as bytes) of one tar shard, streamed in order: a
    shard of several GB is never held whole (WebDataset writes a sample's members together)."""
    fs, path = storage.arrow_fs(uri)
    key, sample = None, {}
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name, _, field = PurePosixPath(member.name).name.partition(".")
                if field not in FIELDS:
                    continue
                if name != key and key is not None:
                    yield key, sample
                    sample = {}
                key, sample[field] = name, tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{uri}: not a readable tar shard ({exc})") from None
    if key is not None:
        yield key, sample


def ingest_rs5m(source: str, images: str) -> tuple[list[dict], dict]:
    """Rows of the samples table for RS5M at `source`, its images written under `images`; and
    counts of what was read and skipped (an empty caption)."""
    rows, counts, seen = [], {"read": 0, "skipped_empty_text": 0}, set()
    for uri in shard_uris(source):
        subset, split, _ = SHARD.match(uri.rsplit("/", 1)[-1]).groups()
        for key, sample in read_shard(uri):
            missing = [f for f in FIELDS if f not in sample]
            if missing:
                raise InputError(f"{uri}: sample {key} has no {', '.join(missing)} (an RS5M sample has {FIELDS})")
            sample_id = f"rs5m-{subset}-{key}"
            if sample_id in seen:
                raise InputError(f"{uri}: sample key {key} appears twice in subset {subset}")
            seen.add(sample_id)
            counts["read"] += 1
            text = sample["caption"].decode("utf-8", errors="replace").strip()
            if not text:
                counts["skipped_empty_text"] += 1
                continue
            # The stored name is only data: its last part, never a path to follow.
            name = PurePosixPath(sample["img_name"].decode("utf-8", errors="replace")).name
            if name in ("", ".", ".."):
                raise InputError(f"{uri}: sample {key} names no image file ({sample['img_name'][:80]!r})")
            image_uri = storage.join(images, subset, f"{key}-{name}")
            storage.write_bytes(image_uri, sample["img_content"])
            rows.append({"sample_id": sample_id, "image_uri": image_uri, "text": text, "entities": [],
                         "split": split, "source": "rs5m"})
    return rows, counts
