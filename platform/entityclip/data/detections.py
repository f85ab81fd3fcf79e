"""Object boxes for a real dataset from a detector's output file (`data.boxes_path`): the
regions the qperturb variant perturbs toward.

The file holds COCO detection results, what most detectors export (Detectron2, MMDetection,
Ultralytics' `save_json`): a JSON list, or JSON Lines, of {"image_id", "bbox": [x, y, width,
height] in pixels, "score"}. `image_id` names the sample's image file, with or without its
extension. Boxes under `data.boxes_min_score` are dropped; the rest become [x0, y0, x1, y1]
fractions of the image's size (read from the file header, not decoded), clipped to the image.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict

from PIL import Image

from entityclip import storage
from entityclip.errors import InputError


def read_detections(uri: str, min_score: float) -> dict[str, list[list[float]]]:
    """image id → its pixel boxes [x, y, w, h] scoring at least `min_score`."""
    text = storage.read_bytes(uri).decode()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in
                                                                          text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise InputError(f"{uri}: not a JSON list or JSON Lines of detections ({exc})") from None
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    for i, r in enumerate(records):
        try:
            x, y, w, h = (float(v) for v in r["bbox"])
            score = float(r.get("score", 1.0))
            image_id = str(r["image_id"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{uri}: detection {i} is not {{image_id, bbox: [x, y, w, h], score}}") from None
        if score >= min_score and w > 0 and h > 0:
            boxes[image_id].append([x, y, w, h])
    return dict(boxes)


def fraction_boxes(pixel_boxes: list[list[float]], width: int, height: int) -> list[list[float]]:
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    return [[clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height)]
            for x, y, w, h in pixel_boxes]


def attach_boxes(rows: list[dict], detections: dict[str, list[list[float]]]) -> int:
    """Set each row's `boxes` from the detections of its image file; returns how many rows got
    any."""
    found = 0
    for row in rows:
        name = row["image_uri"].rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0]
        pixel = detections.get(name, []) + (detections.get(stem, []) if stem != name else [])
        if not pixel:
            row["boxes"] = []
            continue
        with Image.open(io.BytesIO(storage.read_bytes(row["image_uri"]))) as image:
            row["boxes"] = fraction_boxes(pixel, *image.size)
        found += 1
    return found
