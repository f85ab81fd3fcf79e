"""RS5M in its published layout: WebDataset tar shards of (img_name, img_content, caption),
written here as a tiny fixture in that format."""

import io
import tarfile

import pytest
from PIL import Image

from entityclip import storage
from entityclip.config import load_config
from entityclip.data.images import decode_image
from entityclip.data.rs5m import ingest_rs5m
from entityclip.errors import InputError, StorageError


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def shard(path, samples: dict[str, dict[str, bytes]]):
    """A WebDataset tar: each sample's members `<key>.<field>`, one after another."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, fields in samples.items():
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def sample(name: str, caption: str, colour=(10, 20, 30)) -> dict[str, bytes]:
    return {"img_name": name.encode(), "img_content": png(colour), "caption": caption.encode()}


@pytest.fixture()
def rs5m(tmp_path):
    root = tmp_path / "RS5M"
    shard(root / "train" / "pub11-train-0000.tar", {
        "000000": sample("airport_1.jpg", "  An airport with two runways. ", (200, 0, 0)),
        "000001": sample("harbour.png", "A harbour with boats."),
        "000002": sample("empty.png", "   ")})
    shard(root / "train" / "rs3-train-0000.tar", {"000000": sample("fmow_3.jpg", "Farmland in a grid.")})
    shard(root / "val" / "pub11-val-0000.tar", {"000100": sample("dense.png", "A dense residential area.")})
    (root / "README.txt").write_text("not a shard")
    return root


def test_shards_become_samples_with_their_split_subset_and_image(rs5m, tmp_path):
    rows, counts = ingest_rs5m(str(rs5m), str(tmp_path / "images"))
    assert counts == {"read": 5, "skipped_empty_text": 1}
    assert [(r["sample_id"], r["split"], r["text"]) for r in rows] == [
        ("rs5m-pub11-000000", "train", "An airport with two runways."),
        ("rs5m-pub11-000001", "train", "A harbour with boats."),
        ("rs5m-pub11-000100", "val", "A dense residential area."),
        ("rs5m-rs3-000000", "train", "Farmland in a grid.")]
    assert all(r["source"] == "rs5m" and r["entities"] == [] for r in rows)
    first = decode_image(storage.read_bytes(rows[0]["image_uri"]))
    assert first.size == (8, 8) and first.convert("RGB").getpixel((0, 0)) == (200, 0, 0)
    assert rows[0]["image_uri"].endswith("images/pub11/000000-airport_1.jpg")


def test_an_image_name_is_data_never_a_path_to_follow(tmp_path):
    shard(tmp_path / "RS5M" / "pub11-train-0000.tar", {"000007": sample("../../../escape.png", "A road.")})
    rows, _ = ingest_rs5m(str(tmp_path / "RS5M"), str(tmp_path / "images"))
    assert rows[0]["image_uri"] == str(tmp_path / "images" / "pub11" / "000007-escape.png")
    assert not (tmp_path / "escape.png").exists()


def test_broken_shards_and_samples_are_clear_errors(tmp_path):
    with pytest.raises(StorageError, match="no RS5M shards"):
        ingest_rs5m(str(tmp_path / "nothing"), str(tmp_path / "images"))
    incomplete = tmp_path / "a" / "rs3-val-0000.tar"
    shard(incomplete, {"000001": {"img_name": b"x.png", "img_content": png((0, 0, 0))}})
    with pytest.raises(InputError, match="sample 000001 has no caption"):
        ingest_rs5m(str(incomplete.parent), str(tmp_path / "images"))
    corrupt = tmp_path / "b" / "pub11-train-0001.tar"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(InputError, match="not a readable tar shard"):
        ingest_rs5m(str(corrupt.parent), str(tmp_path / "images"))


def test_the_data_stage_ingests_rs5m_into_samples_and_shards(ray_session, rs5m, tmp_path):
    from entityclip.pipeline import stage_data

    cfg = load_config(None, [f"storage.root={tmp_path / 'run'}", "data.source=rs5m", f"data.source_path={rs5m}"])
    out = stage_data(cfg, progress=False)
    assert out["written"] == 4 and out["train_rows"] == 3 and out["val_rows"] == 1
    assert all(u.startswith(str(tmp_path / "run" / "data" / "images")) for u in
               storage.read_parquet(out["samples"]).column("image_uri").to_pylist())
