"""Ingest: the real EITM datasets' own formats → samples.parquet (docs/entityclip-paper.md §4).

Layouts, as the official EntityCLIP code reads them:
- n24news:    news/nytimes_{train,dev,test}.json (list; image_id, caption, headline, ...),
              images at imgs/{image_id}.jpg; the query text is the caption.
- visualnews: {train,val,test}.json (list; id, caption, image_path like
              './washington_post/images/0376/501.jpg'), images under images/.
- goodnews:   new_goodnews_capim_{train,val,test}.json (list; image_id, captioning, title),
              images under images/; broken_images.txt (optional) lists files to skip.
The datasets name no entity lists, so `entities` is empty: an LLM engine finds them in the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from entityclip import storage
from entityclip.errors import InputError, StorageError

SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test"}


@dataclass(frozen=True)
class Format:
    split_files: dict[str, str]  # split name in the dataset → relative path of its JSON list
    row: Callable[[str, dict], tuple[str, str, str]]  # (root, record) → (sample_id, image_uri, text)


def _n24news(root: str, r: dict) -> tuple[str, str, str]:
    return f"n24news-{r['image_id']}", storage.join(root, "imgs", f"{r['image_id']}.jpg"), r["caption"]


def _visualnews(root: str, r: dict) -> tuple[str, str, str]:
    return f"visualnews-{r['id']}", storage.join(root, "images", r["image_path"].lstrip("./")), r["caption"]


def _goodnews(root: str, r: dict) -> tuple[str, str, str]:
    text = r["captioning"].replace("\r\n", " ").replace("\r", " ")
    return f"goodnews-{r['image_id'].rsplit('.', 1)[0]}", storage.join(root, "images", r["image_id"]), text


FORMATS = {
    "n24news": Format({s: f"news/nytimes_{s}.json" for s in ("train", "dev", "test")}, _n24news),
    "visualnews": Format({s: f"{s}.json" for s in ("train", "val", "test")}, _visualnews),
    "goodnews": Format({s: f"new_goodnews_capim_{s}.json" for s in ("train", "val", "test")}, _goodnews),
}


def _broken(source: str, name: str) -> set[str]:
    uri = storage.join(source, "broken_images.txt")
    if name != "goodnews" or not storage.exists(uri):
        return set()
    return {line.strip() for line in storage.read_bytes(uri).decode().splitlines() if line.strip()}


def ingest(name: str, source: str, skip_missing_images: bool = False) -> tuple[list[dict], dict]:
    """Rows of the samples table for a dataset at `source`, and counts of what was read/skipped."""
    if name not in FORMATS:
        raise InputError(f"unknown dataset format {name!r}; choose one of {sorted(FORMATS)}")
    fmt = FORMATS[name]
    broken, rows, missing = _broken(source, name), [], []
    counts = {"read": 0, "skipped_broken": 0, "skipped_missing_image": 0, "skipped_empty_text": 0}
    for split, rel in fmt.split_files.items():
        uri = storage.join(source, rel)
        try:
            records = json.loads(storage.read_bytes(uri))
        except StorageError:
            raise StorageError(f"{uri}: missing; a {name} dataset has {sorted(fmt.split_files.values())}") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{uri}: not valid JSON ({exc})") from None
        for i, record in enumerate(records):
            try:
                sample_id, image_uri, text = fmt.row(source, record)
            except (KeyError, AttributeError, TypeError):
                raise InputError(f"{uri}: record {i} lacks the fields a {name} record has") from None
            counts["read"] += 1
            if image_uri.rsplit("/", 1)[-1] in broken:
                counts["skipped_broken"] += 1
                continue
            if not text.strip():
                counts["skipped_empty_text"] += 1
                continue
            if not storage.exists(image_uri):
                missing.append(image_uri)
                counts["skipped_missing_image"] += 1
                continue
            rows.append({"sample_id": sample_id, "image_uri": image_uri, "text": text.strip(), "entities": [],
                         "split": SPLITS[split], "source": name})
    if missing and not skip_missing_images:
        raise InputError(f"{len(missing)} images are missing, e.g. {missing[:3]}; "
                         "set data.skip_missing_images=true to leave those samples out")
    return rows, counts
