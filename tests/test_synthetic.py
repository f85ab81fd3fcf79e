import re

import numpy as np
import pytest

from entityclip import storage
from entityclip.config import DataConfig
from entityclip.data.images import decode_image
from entityclip.data.synthetic import COLOURS, MORE_SHAPES, PATTERNS, SETTINGS, SHAPES, generate, make_world, visible_look


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    uris = generate(DataConfig(num_entities=8, samples_per_entity=5, image_size=32), root, progress=False)
    return {"samples": storage.read_parquet(uris["samples"]).to_pylist(),
            "entities": storage.read_parquet(uris["entities"]).to_pylist()}


def test_samples_follow_the_table_contract(dataset):
    s = dataset["samples"][0]
    assert set(s) == {"sample_id", "image_uri", "text", "entities", "split", "source", "boxes"}
    assert len(dataset["samples"]) == 40
    assert len({s["sample_id"] for s in dataset["samples"]}) == 40


def test_each_entity_comes_with_the_box_its_emblem_was_drawn_in(dataset):
    for s in dataset["samples"]:
        assert len(s["boxes"]) == len(s["entities"])
        for x0, y0, x1, y1 in s["boxes"]:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    # The emblems are drawn where the boxes say: pixels far from the scene's background colour
    # are common inside the first box and rarer outside every box.
    entity = {e["name"]: e for e in dataset["entities"]}
    for s in dataset["samples"][:10]:
        pixels = np.asarray(decode_image(storage.read_bytes(s["image_uri"])).convert("RGB"), dtype=np.float32)
        off_background = np.abs(pixels - SETTINGS[entity[s["entities"][0]]["setting"]]).sum(-1) > 60
        size = pixels.shape[0]
        in_box = np.zeros_like(off_background)
        for x0, y0, x1, y1 in s["boxes"]:
            in_box[int(y0 * size):int(y1 * size), int(x0 * size):int(x1 * size)] = True
        x0, y0, x1, y1 = s["boxes"][0]
        first = off_background[int(y0 * size):int(y1 * size), int(x0 * size):int(x1 * size)]
        assert first.mean() > 0.3 and first.mean() > off_background[~in_box].mean()


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


def test_a_world_beyond_the_first_192_looks_tells_entities_apart_by_everything_the_emblem_shows():
    world = make_world(1760, seed=0)
    assert len({visible_look(e.primary, e.shape, e.pattern, e.secondary) for e in world}) == 1760
    assert len({e.name for e in world}) == 1760
    assert {e.shape for e in world} == set(SHAPES + MORE_SHAPES)
    with pytest.raises(ValueError, match="at most 1760 entities"):
        make_world(1761, seed=0)


def test_growing_the_world_keeps_every_smaller_world_as_it_was():
    # The default world's entities (and so README's figures) stay those of the first 192 looks.
    assert make_world(1024, seed=0)[:96] == make_world(96, seed=0)
    assert make_world(300, seed=5)[:192] == make_world(192, seed=5)


def test_the_new_shapes_draw_distinct_masks():
    from entityclip.data.synthetic import Entity, _emblem

    masks = {shape: np.asarray(_emblem(Entity("e", "n", "band", "red", "white", shape, "solid", "a grass field"), 48))[..., 3] > 0
             for shape in SHAPES + MORE_SHAPES}
    assert all(0.2 < m.mean() < 0.99 for m in masks.values())
    shapes = list(masks)
    assert all((masks[a] != masks[b]).mean() > 0.05 for i, a in enumerate(shapes) for b in shapes[i + 1:])
