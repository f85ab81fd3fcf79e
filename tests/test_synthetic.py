import re

import pytest

from entityclip import storage
from entityclip.config import DataConfig
from entityclip.data.images import decode_image
from entityclip.data.synthetic import COLOURS, PATTERNS, SHAPES, generate, make_world


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    uris = generate(DataConfig(num_entities=8, samples_per_entity=5, image_size=32), root, progress=False)
    return {"samples": storage.read_parquet(uris["samples"]).to_pylist(),
            "entities": storage.read_parquet(uris["entities"]).to_pylist()}


def test_samples_follow_the_table_contract(dataset):
    s = dataset["samples"][0]
    assert set(s) == {"sample_id", "image_uri", "text", "entities", "split", "source"}
    assert len(dataset["samples"]) == 40
    assert len({s["sample_id"] for s in dataset["samples"]}) == 40


def test_unseen_entities_never_appear_in_training(dataset):
    unseen = {s["entities"][0] for s in dataset["samples"] if s["split"] == "test_unseen"}
    train = {e for s in dataset["samples"] if s["split"] == "train" for e in s["entities"]}
    assert unseen and not unseen & train
    assert {s["split"] for s in dataset["samples"]} == {"train", "test_seen", "test_unseen"}


def test_texts_name_entities_but_never_their_looks(dataset):
    looks = set(COLOURS) | set(SHAPES) | set(PATTERNS)
    for s in dataset["samples"]:
        assert all(name in s["text"] for name in s["entities"])
        words = set(re.findall(r"[a-z]+", s["text"].lower()))
        assert not words & looks, s["text"]


def test_images_decode_at_the_configured_size(dataset):
    img = decode_image(storage.read_bytes(dataset["samples"][0]["image_uri"]))
    assert img.size == (32, 32)


def test_entities_have_distinct_looks_and_generation_is_deterministic():
    a, b = make_world(20, seed=3), make_world(20, seed=3)
    assert a == b
    assert len({(e.primary, e.shape, e.pattern) for e in a}) == 20
    assert len({e.name for e in a}) == 20
    assert make_world(20, seed=4) != a
