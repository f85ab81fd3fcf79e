"""Ingesting the real datasets' own formats (tiny fixtures written in each format)."""

import json
from dataclasses import replace

import pytest
from PIL import Image

from entityclip import storage
from entityclip.config import load_config
from entityclip.data.formats import ingest
from entityclip.errors import ConfigError, InputError, StorageError
from entityclip.pipeline import stage_data, stage_explain


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


@pytest.fixture()
def n24news(tmp_path):
    root = tmp_path / "N24News"
    for split, ids in {"train": ["a1", "a2"], "dev": ["b1"], "test": ["c1"]}.items():
        write(root / "news" / f"nytimes_{split}.json",
              [{"image_id": i, "caption": f"Caption {i}", "headline": "H", "section": "Sports"} for i in ids])
        for i in ids:
            image(root / "imgs" / f"{i}.jpg")
    return root


def test_n24news_captions_become_samples_with_mapped_splits(n24news):
    rows, counts = ingest("n24news", str(n24news))
    assert counts["read"] == len(rows) == 4
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    a1 = next(r for r in rows if r["sample_id"] == "n24news-a1")
    assert a1["text"] == "Caption a1" and a1["image_uri"].endswith("imgs/a1.jpg") and a1["entities"] == []


def test_visualnews_image_paths_resolve_under_images(tmp_path):
    root = tmp_path / "VisualNews"
    for split in ("train", "val", "test"):
        write(root / f"{split}.json", [{"id": 7 if split == "train" else 8, "caption": "C",
                                         "image_path": "./bbc/images/0001/7.jpg"}])
    image(root / "images" / "bbc" / "images" / "0001" / "7.jpg")
    rows, _ = ingest("visualnews", str(root))
    assert rows[0]["image_uri"] == f"{root}/images/bbc/images/0001/7.jpg"


def test_goodnews_skips_listed_broken_images_and_cleans_captions(tmp_path):
    root = tmp_path / "GoodNews"
    for split in ("train", "val", "test"):
        write(root / f"new_goodnews_capim_{split}.json",
              [{"image_id": f"{split}_1.jpg", "captioning": "Line one\r\nline two", "title": "T"},
               {"image_id": f"{split}_2.jpg", "captioning": "x", "title": "T"}])
        image(root / "images" / f"{split}_1.jpg")
        image(root / "images" / f"{split}_2.jpg")
    (root / "broken_images.txt").write_text("train_2.jpg\n")
    rows, counts = ingest("goodnews", str(root))
    assert counts["skipped_broken"] == 1 and len(rows) == 5
    assert next(r for r in rows if r["sample_id"] == "goodnews-train_1")["text"] == "Line one line two"


def test_missing_images_are_an_error_unless_skipping_is_asked_for(n24news):
    (n24news / "imgs" / "a2.jpg").unlink()
    with pytest.raises(InputError, match="1 images are missing"):
        ingest("n24news", str(n24news))
    rows, counts = ingest("n24news", str(n24news), skip_missing_images=True)
    assert counts["skipped_missing_image"] == 1 and len(rows) == 3


def test_missing_split_files_and_bad_records_are_clear_errors(n24news, tmp_path):
    with pytest.raises(StorageError, match="missing"):
        ingest("visualnews", str(tmp_path / "nothing"))
    write(n24news / "news" / "nytimes_dev.json", [{"caption": "no image id"}])
    with pytest.raises(InputError, match="record 0 lacks the fields"):
        ingest("n24news", str(n24news))
    with pytest.raises(InputError, match="unknown dataset format"):
        ingest("coco", str(n24news))


def test_the_data_stage_ingests_a_real_format_and_explain_asks_for_an_llm(ray_session, n24news, tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path / 'run'}", "data.source=n24news", f"data.source_path={n24news}"])
    out = stage_data(cfg)
    assert out["written"] == 4 and storage.read_parquet(out["samples"]).num_rows == 4
    with pytest.raises(ConfigError, match="set explain.model to a local LLM folder"):
        stage_explain(cfg)  # the default model is the synthetic world's LM
    with pytest.raises(ConfigError, match="explain.engine=vllm"):
        stage_explain(replace(cfg, explain=replace(cfg.explain, engine="knowledge")))
    with pytest.raises(ConfigError, match="needs data.source_path"):
        stage_data(load_config(None, [f"storage.root={tmp_path / 'r2'}", "data.source=goodnews"]))


def test_a_detectors_coco_results_become_the_samples_boxes(ray_session, n24news, tmp_path):
    Image.new("RGB", (200, 100)).save(n24news / "imgs" / "a1.jpg")  # boxes are fractions of each image's size
    detections = [{"image_id": "a1", "bbox": [50, 25, 100, 50], "score": 0.9},
                  {"image_id": "a1.jpg", "bbox": [150, 0, 100, 200], "score": 0.8},  # by file name; clipped
                  {"image_id": "a1", "bbox": [0, 0, 10, 10], "score": 0.1},  # under boxes_min_score
                  {"image_id": "b1", "bbox": [0, 0, 4, 4], "score": 0.7}]
    boxes_file = tmp_path / "detections.jsonl"
    boxes_file.write_text("\n".join(json.dumps(d) for d in detections))
    cfg = load_config(None, ["data.source=n24news", f"data.source_path={n24news}", f"storage.root={tmp_path / 'run'}",
                             f"data.boxes_path={boxes_file}"])
    out = stage_data(cfg, progress=False)
    assert out["with_boxes"] == 2
    rows = {r["sample_id"]: r for r in storage.read_parquet(str(tmp_path / "run" / "data" / "samples.parquet")).to_pylist()}
    assert sorted(rows["n24news-a1"]["boxes"]) == [pytest.approx([0.25, 0.25, 0.75, 0.75]), pytest.approx([0.75, 0.0, 1.0, 1.0])]
    assert rows["n24news-b1"]["boxes"] == [pytest.approx([0.0, 0.0, 0.5, 0.5])]
    assert rows["n24news-c1"]["boxes"] == []

    boxes_file.write_text('[{"image_id": "a1", "box": [1, 2, 3, 4]}]')
    with pytest.raises(InputError, match="detection 0 is not"):
        stage_data(cfg, progress=False)
