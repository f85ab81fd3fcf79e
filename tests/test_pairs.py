import pyarrow as pa
import pytest

from entityclip import storage
from entityclip.config import DataConfig
from entityclip.data.pairs import NAME_MASK, PairDataset, load_pairs, mask_names
from entityclip.data.synthetic import generate
from entityclip.errors import InputError


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


def test_dataset_masks_names_at_the_configured_rate(run):
    pairs = load_pairs(*run)
    never, always = PairDataset(pairs, 16, name_mask_prob=0.0), PairDataset(pairs, 16, name_mask_prob=1.0)
    assert [never[i][1] for i in range(len(pairs))] == [p.text for p in pairs]
    assert all(NAME_MASK in always[i][1] and pairs[i].entities[0] not in always[i][1] for i in range(len(pairs)))
    assert never[0][0].shape == (3, 16, 16)
