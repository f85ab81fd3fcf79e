"""A corrupt image in a run's data stops the stage with one clear line naming the file."""

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from entityclip import storage
from entityclip.data.shards import read_manifest, split_rows, write_shards
from entityclip.errors import InputError, find_user_error
from entityclip.pipeline import stage_train
from tests.conftest import tiny_config


def corrupt_copy(trained_run, tmp_path) -> Path:
    """A copy of the session's run in which one sample's image is garbage."""
    root = tmp_path / "corrupt"
    shutil.copytree(trained_run["root"], root, ignore=shutil.ignore_patterns("mlflow.db", "ray_results"))
    samples = storage.read_parquet(str(root / "data" / "samples.parquet")).to_pylist()
    bad = root / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    samples[0]["image_uri"] = str(bad)
    storage.write_parquet(str(root / "data" / "samples.parquet"), pa.Table.from_pylist(samples))
    return root


def test_indexing_a_corrupt_image_is_a_clear_cli_error(trained_run, tmp_path, cluster_env):
    root = corrupt_copy(trained_run, tmp_path)
    entityclip = str(Path(sys.executable).parent / "entityclip")
    result = subprocess.run([entityclip, "index", "--config", "configs/tiny.yaml", "--root", str(root)],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                            env=cluster_env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{root}/bad.png" in result.stderr and "cannot be decoded" in result.stderr
    assert "Traceback" not in result.stderr


def test_writing_shards_of_a_corrupt_image_names_the_sample(trained_run, tmp_path, ray_session):
    root = corrupt_copy(trained_run, tmp_path)
    samples = storage.read_parquet(str(root / "data" / "samples.parquet")).to_pylist()
    with pytest.raises(Exception) as info:
        write_shards(str(root / "data" / "samples.parquet"), str(root / "data" / "shards"), 64)
    err = find_user_error(info.value)
    assert isinstance(err, InputError)
    assert samples[0]["sample_id"] in str(err) and "cannot be decoded" in str(err)
    # The failed write left the run's previous shards in place, complete.
    assert split_rows(str(root / "data" / "shards"), "train") == sum(s["split"] == "train" for s in samples)


def test_training_on_a_corrupt_shard_image_names_the_sample(trained_run, tmp_path, mlflow_server):
    root = corrupt_copy(trained_run, tmp_path)
    shards = str(root / "data" / "shards")
    first = storage.join(shards, read_manifest(shards)["splits"]["train"]["files"][0])
    table = storage.read_parquet(first)
    images = table["image"].to_pylist()
    images[0] = b"\x89PNG\r\n\x1a\n truncated"
    storage.write_parquet(first, table.set_column(table.schema.get_field_index("image"), "image",
                                                  pa.array(images, pa.binary())))
    cfg = tiny_config(root, f"tracking.uri={mlflow_server}", "tracking.experiment=bad-data", "train.max_failures=0")
    with pytest.raises(Exception) as info:
        stage_train(cfg, progress=False)
    err = find_user_error(info.value)
    assert isinstance(err, InputError)
    assert table["sample_id"][0].as_py() in str(err) and "cannot be decoded" in str(err)
