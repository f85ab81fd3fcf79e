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
    uris = generate(DataConfig(num_entities=8, samples_per_entity=5, image_size=32, compositional_pairs=3), root,
                    progress=False)
    return {"samples": storage.read_parquet(uris["samples"]).to_pylist(),
            "entities": storage.read_parquet(uris["entities"]).to_pylist()}


def test_samples_follow_the_table_contract(dataset):
    s = dataset["samples"][0]
    assert set(s) == {"sample_id", "image_uri", "text", "entities", "split", "source", "boxes", "reference_uri"}
    # 8 x 5, 3 minimal pairs of each of 2 kinds, and 4 composed queries per entity
    assert len(dataset["samples"]) == 40 + 2 * 3 * 2 + 8 * 4
    assert len({s["sample_id"] for s in dataset["samples"]}) == 84


def test_each_entity_comes_with_the_box_its_emblem_was_drawn_in(dataset):
    for s in dataset["samples"]:
        # A composed query's text names no entity; its target image shows one emblem.
        assert len(s["boxes"]) == (1 if s["reference_uri"] else len(s["entities"]))
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
    assert {s["split"] for s in dataset["samples"]} == {"train", "test_seen", "test_unseen", "test_compositional",
                                                        "train_composed", "test_composed"}


def test_texts_name_entities_but_never_their_looks(dataset):
    looks = set(COLOURS) | set(SHAPES) | set(PATTERNS)
    for s in dataset["samples"]:
        assert all(name in s["text"] for name in s["entities"])
        words = set(re.findall(r"[a-z]+", s["text"].lower()))
        assert not words & looks, s["text"]


def test_a_compositional_pair_says_the_same_words_of_the_same_seen_entities_in_another_composition(dataset):
    rows = [s for s in dataset["samples"] if s["split"] == "test_compositional"]
    train = {e for s in dataset["samples"] if s["split"] == "train" for e in s["entities"]}
    pairs: dict[str, list[dict]] = {}
    for s in rows:
        pairs.setdefault(s["sample_id"].rsplit("-", 1)[0], []).append(s)
    assert sorted(k.split("-")[1] for k in pairs) == ["binding"] * 3 + ["relation"] * 3
    for name, (first, second) in pairs.items():
        assert first["text"] != second["text"]
        assert sorted(re.findall(r"\w+", first["text"])) == sorted(re.findall(r"\w+", second["text"]))  # one bag of words
        assert set(first["entities"]) == set(second["entities"]) and set(first["entities"]) <= train
        assert storage.read_bytes(first["image_uri"]) != storage.read_bytes(second["image_uri"])
        for s in (first, second):
            box = dict(zip(s["entities"], s["boxes"]))
            a, b = s["entities"]
            if "relation" in name:  # the entity named first is the one on the left
                named_left = re.match(r"(.+) on the left", s["text"]).group(1)
                other = b if named_left == a else a
                assert box[named_left][2] <= box[other][0]
            else:  # the entity called large is drawn larger
                large = re.search(r"a large (.+?) emblem", s["text"]).group(1)
                small = b if large == a else a
                assert box[large][2] - box[large][0] > box[small][2] - box[small][0]


def test_a_composed_query_changes_only_the_setting_of_an_entity_its_reference_image_shows(dataset):
    entity = {e["name"]: e for e in dataset["entities"]}
    by_id = {e["entity_id"]: e for e in dataset["entities"]}
    samples = {s["image_uri"]: s for s in dataset["samples"]}
    composed = [s for s in dataset["samples"] if s["reference_uri"]]
    assert {s["split"] for s in composed} == {"train_composed", "test_composed"}
    seen_settings: dict[str, list[str]] = {}
    for s in composed:
        target = by_id[s["sample_id"].split("-")[1]]
        setting = re.fullmatch(r"this emblem, but on (.+)\.", s["text"]).group(1)
        assert s["entities"] == [] and setting in SETTINGS and setting != target["setting"]
        seen_settings.setdefault(target["entity_id"], []).append(setting)
        # The reference is one of the entity's own scenes, from the split its training allows.
        reference = samples[s["reference_uri"]]
        assert entity[reference["entities"][0]] == target
        assert reference["split"] == ("test_unseen" if s["split"] == "test_composed" else "train")
        # The target is drawn in the setting the text names.
        pixels = np.asarray(decode_image(storage.read_bytes(s["image_uri"])).convert("RGB"), dtype=np.float32)
        assert np.abs(pixels[0, 0] - SETTINGS[setting]).max() < 60 or np.abs(pixels[-1, -1] - SETTINGS[setting]).max() < 60
    assert all(len(set(v)) == len(v) == 4 for v in seen_settings.values())  # 4 queries: the 4 other settings


@pytest.mark.parametrize("added", [{"compositional_pairs": 4}, {"composed_per_entity": 4}])
def test_an_added_split_leaves_every_other_split_as_it_was(tmp_path, added):
    def other_splits(extra: dict) -> list[tuple]:
        root = str(tmp_path / str(len(extra)))
        cfg = DataConfig(**{"num_entities": 8, "samples_per_entity": 3, "image_size": 32, "compositional_pairs": 0,
                            "composed_per_entity": 0, **extra})
        rows = storage.read_parquet(generate(cfg, root, progress=False)["samples"])
        return [(r["sample_id"], r["text"], r["entities"], r["boxes"], storage.read_bytes(r["image_uri"]))
                for r in rows.to_pylist() if r["split"] in ("train", "test_seen", "test_unseen")]

    assert other_splits({}) == other_splits(added)


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


def shard_files(root: str, data_cfg: DataConfig, rows_per_file: int) -> tuple[str, dict, dict[str, list[list[str]]]]:
    """Generate a world under `root` and write its shards: (the samples' URI, the manifest, per
    split the sample ids of each shard file in order)."""
    from entityclip.data.shards import write_shards

    samples = generate(data_cfg, root, progress=False)["samples"]
    shards = storage.join(root, "shards")
    manifest = write_shards(samples, shards, rows_per_file)
    return samples, manifest, {split: [storage.read_parquet(storage.join(shards, f)).column("sample_id").to_pylist()
                              for f in entry["files"]] for split, entry in manifest["splits"].items()}


def test_the_added_splits_leave_the_training_order_as_it_was(tmp_path, ray_session):
    def train_order(added: int) -> list[str]:
        _, _, files = shard_files(str(tmp_path / str(added)), DataConfig(
            num_entities=8, samples_per_entity=3, image_size=16, compositional_pairs=added, composed_per_entity=added), 1024)
        return [i for ids in files["train"] for i in ids]

    assert train_order(0) == train_order(3)


def test_compositional_training_pairs_join_the_train_split_with_other_entity_pairs_than_the_test(tmp_path):
    cfg = DataConfig(num_entities=12, samples_per_entity=3, image_size=16, compositional_pairs=3,
                     compositional_train_pairs=4, composed_per_entity=0)
    rows = storage.read_parquet(generate(cfg, str(tmp_path), progress=False)["samples"]).to_pylist()
    train = [r for r in rows if r["sample_id"].startswith("comptrain-")]
    assert len(train) == 2 * 4 * 2 and {r["split"] for r in train} == {"train"}
    test_pairs = {frozenset(r["entities"]) for r in rows if r["split"] == "test_compositional"}
    assert not {frozenset(r["entities"]) for r in train} & test_pairs
    unseen = {e for r in rows if r["split"] == "test_unseen" for e in r["entities"]}
    assert not {e for r in train for e in r["entities"]} & unseen
    # The default adds none: the world is what it was.
    default = DataConfig(num_entities=12, samples_per_entity=3, image_size=16, compositional_pairs=3, composed_per_entity=0)
    plain = storage.read_parquet(generate(default, str(tmp_path / "plain"), progress=False)["samples"]).to_pylist()
    assert [r["sample_id"] for r in plain] == [r["sample_id"] for r in rows if not r["sample_id"].startswith("comptrain-")]


def test_shards_hold_at_most_shard_rows_each_so_no_writer_holds_more(tmp_path, ray_session):
    """Ray's Parquet writer keeps all of a write task's rows in memory: each task gets one shard's
    rows, so a data-stage worker holds one shard however large the dataset (docs/scale.md)."""
    samples, manifest, files = shard_files(str(tmp_path), DataConfig(
        num_entities=8, samples_per_entity=4, image_size=16, compositional_pairs=0, composed_per_entity=0), 5)
    rows = [ids for split in files.values() for ids in split]
    assert max(len(r) for r in rows) <= 5
    assert sorted(i for r in rows for i in r) == sorted(storage.read_parquet(samples).column("sample_id").to_pylist())
    assert sum(split["rows"] for split in manifest["splits"].values()) == 32
