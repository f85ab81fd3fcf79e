"""The samples table contract: sample_id, image_uri, text, entities[], split, source."""

from __future__ import annotations

import pyarrow as pa

SAMPLES_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("image_uri", pa.string()), ("text", pa.string()),
    ("entities", pa.list_(pa.string())), ("split", pa.string()), ("source", pa.string()),
])


def samples_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
