"""The samples table contract: sample_id, image_uri, text, entities[], split, source, and
boxes[]: the image's object regions as [x0, y0, x1, y1] fractions of its width and height
(the synthetic world draws them; other sources may leave them empty, or take them from a
detector's output). Object-aware variants (qperturb) read them; the others ignore them.
reference_uri: for a composed query only (null elsewhere), the image that its text modifies;
the sample's own image is the query's target.

Splits: train, test_seen, test_unseen, and test_compositional: minimal pairs whose two texts use
the same words and differ only in composition (who is where, which emblem is large), each text
relevant to its own image alone (evaluate.py scores it with pair relevance). A minimal pair's
samples are named comp-<kind>-<pair>-0 and comp-<kind>-<pair>-1.

Composed queries (VISTA-style): train_composed and test_composed rows are (reference image,
text saying what changes, target image) triplets. Only composed-query variants (vista) train on
train_composed; test_composed is scored with the target as the one relevant image."""

from __future__ import annotations

import hashlib

import pyarrow as pa

COMPOSITIONAL_SPLIT = "test_compositional"
TRAIN_COMPOSED_SPLIT = "train_composed"
COMPOSED_SPLIT = "test_composed"
# Splits added after the first three: generated from their own random streams and kept out of
# the shards' shuffle, so that every older split, and every training run, stays as it was.
ADDED_SPLITS = (COMPOSITIONAL_SPLIT, TRAIN_COMPOSED_SPLIT, COMPOSED_SPLIT)
# Splits where each query's own item is its one relevant item.
PAIR_RELEVANCE_SPLITS = (COMPOSITIONAL_SPLIT, COMPOSED_SPLIT)

SAMPLES_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("image_uri", pa.string()), ("text", pa.string()),
    ("entities", pa.list_(pa.string())), ("split", pa.string()), ("source", pa.string()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))), ("reference_uri", pa.string()),
])


def samples_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)


def minimal_pair_partner(sample_id: str) -> str | None:
    """The other sample of a compositional minimal pair (comp-<kind>-<pair>-<0|1>); None for
    any other sample."""
    stem, _, member = sample_id.rpartition("-")
    return f"{stem}-{1 - int(member)}" if sample_id.startswith("comp-") and member in ("0", "1") else None


def stable_id(key: str) -> int:
    """A 63-bit hash of `key`, the same in every process and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1
