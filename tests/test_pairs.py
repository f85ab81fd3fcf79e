import numpy as np
import pyarrow as pa
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from entityclip import storage
from entityclip.config import DataConfig
from entityclip.data.pairs import NAME_MASK, load_pairs, mask_names
from entityclip.data.synthetic import generate
from entityclip.errors import InputError
from entityclip.train.ingest import MaskNames, entity_group, preprocess


@pytest.fixture()
def run(tmp_path):
    uris = generate(DataConfig(num_entities=4, samples_per_entity=3, image_size=16), str(tmp_path), progress=False)
    samples = storage.read_parquet(uris["samples"]).to_pylist()
    rows = [{"sample_id": s["sample_id"], "explanation": f"looks of {s['sample_id']}"} for s in samples]
    storage.write_parquet(str(tmp_path / "explanations.parquet"), pa.Table.from_pylist(rows))
    return uris["samples"], str(tmp_path / "explanations.parquet")


def test_pairs_join_samples_with_their_explanations(run):
    pairs = load_pairs(*run, splits=["train"])
    assert pairs and all(p.split == "train" for p in pairs)
    assert all(p.explanation == f"looks of {p.sample_id}" for p in pairs)


def test_a_sample_without_explanation_is_an_input_error(run, tmp_path):
    samples, _ = run
    storage.write_parquet(str(tmp_path / "partial.parquet"), pa.Table.from_pylist([{"sample_id": "x", "explanation": "y"}]))
    with pytest.raises(InputError, match="no explanation"):
        load_pairs(samples, str(tmp_path / "partial.parquet"))


def test_name_masking_hides_every_named_entity():
    assert mask_names("Vel Rovers beat Tak United.", ("Vel Rovers", "Tak United")) == f"{NAME_MASK} beat {NAME_MASK}."


def test_preprocess_decodes_and_tokenizes_and_the_collate_masks_names_at_its_rate(run):
    pairs = load_pairs(*run)
    batch = {"sample_id": [p.sample_id for p in pairs], "image": [storage.read_bytes(p.image_uri) for p in pairs],
             "text": [p.text for p in pairs], "entities": [list(p.entities) for p in pairs],
             "explanation": [p.explanation for p in pairs]}
    tokenize = SimpleTokenizer(context_length=24)
    rows = preprocess(batch, image_size=16, context_length=24, masking=True, with_explanations=True)
    assert rows["image"].shape == (len(pairs), 3, 16, 16) and rows["image"].dtype == np.float32
    assert (rows["explanation_ids"] == tokenize([p.explanation for p in pairs]).numpy()).all()
    never, always = MaskNames(0.0)(dict(rows)), MaskNames(1.0)(dict(rows))
    assert (never["text_ids"].numpy() == tokenize([p.text for p in pairs]).numpy()).all()
    assert (always["text_ids"].numpy() == tokenize([mask_names(p.text, p.entities) for p in pairs]).numpy()).all()
    assert "masked_text_ids" not in always and always["image"].dtype == torch.float32
    plain = preprocess(batch, image_size=16, context_length=24, masking=False, with_explanations=False)
    assert set(plain) == {"image", "text_ids"}


def test_rows_showing_the_same_entities_share_a_group_and_rows_naming_none_are_alone():
    assert entity_group("a", ["Velmora Rovers", "Ostrava Kites"]) == entity_group("b", ["Ostrava Kites", "Velmora Rovers"])
    assert entity_group("a", ["Velmora Rovers"]) != entity_group("a", ["Velmora Rovers", "Ostrava Kites"])
    assert entity_group("a", []) != entity_group("b", [])


def test_preprocess_gives_each_row_its_entity_group(run):
    pairs = load_pairs(*run)
    batch = {"sample_id": [p.sample_id for p in pairs], "image": [storage.read_bytes(p.image_uri) for p in pairs],
             "text": [p.text for p in pairs], "entities": [list(p.entities) for p in pairs]}
    rows = preprocess(batch, image_size=16, context_length=24, masking=False, with_explanations=False, groups=True)
    assert rows["group"].dtype == np.int64
    same = rows["group"][:, None] == rows["group"][None, :]
    # rows naming no entity (composed queries) are alone in their group
    expected = np.array([[(set(a.entities) == set(b.entities) and bool(a.entities)) or a is b for b in pairs]
                         for a in pairs])
    assert (same == expected).all() and not same.all()


def test_preprocess_names_the_sample_whose_image_is_corrupt(run):
    pairs = load_pairs(*run)[:2]
    batch = {"sample_id": [p.sample_id for p in pairs], "image": [b"\x89PNG garbage", b"x"],
             "text": [p.text for p in pairs], "entities": [list(p.entities) for p in pairs]}
    with pytest.raises(InputError, match=f"sample {pairs[0].sample_id}: image cannot be decoded"):
        preprocess(batch, image_size=16, context_length=24, masking=False, with_explanations=False)
