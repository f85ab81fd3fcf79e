import json
import time

import pyarrow as pa
import pytest

from entityclip import storage
from entityclip.errors import StorageError


def test_local_roundtrip_and_listing(tmp_path):
    root = str(tmp_path / "root")
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_parquet(storage.join(root, "t.parquet"), pa.table({"a": [1, 2]}))
    assert storage.read_bytes(storage.join(root, "a/x.bin")) == b"hello"
    assert storage.read_parquet(storage.join(root, "t.parquet")).column("a").to_pylist() == [1, 2]
    assert [p.rsplit("/", 1)[-1] for p in storage.list_uris(root)] == ["x.bin", "t.parquet"]
    assert storage.exists(f"file://{root}/a/x.bin")


def test_local_writes_leave_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    storage.write_bytes(str(target), b"v1")
    storage.write_bytes(str(target), b"v2")
    assert target.read_bytes() == b"v2"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_missing_local_file_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "missing.parquet"))


def test_corrupt_parquet_is_a_storage_error(tmp_path):
    storage.write_bytes(str(tmp_path / "bad.parquet"), b"not parquet")
    with pytest.raises(StorageError, match="not a valid Parquet"):
        storage.read_parquet(str(tmp_path / "bad.parquet"))


def test_s3_roundtrip_listing_and_dirs(s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/storage-test"
    storage.write_bytes(f"{root}/a/x.bin", b"hello")
    storage.write_parquet(f"{root}/t.parquet", pa.table({"a": [3]}))
    assert storage.read_bytes(f"{root}/a/x.bin") == b"hello"
    assert storage.read_parquet(f"{root}/t.parquet").column("a").to_pylist() == [3]
    assert storage.list_uris(root) == [f"{root}/a/x.bin", f"{root}/t.parquet"]
    assert storage.exists(f"{root}/a/x.bin") and not storage.exists(f"{root}/nope")

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f.txt").write_text("data")
    storage.upload_dir(tmp_path / "d", f"{root}/dir")
    back = storage.download_dir(f"{root}/dir", tmp_path / "back")
    assert (back / "sub" / "f.txt").read_text() == "data"


def test_a_key_that_leads_outside_the_download_folder_is_refused_before_anything_is_written(
        s3_bucket, tmp_path, monkeypatch):
    root = f"s3://{s3_bucket}/traversal"
    storage.write_bytes(f"{root}/model.json", b"{}")
    # AWS S3 stores a key such as "traversal/../../escaped.txt" as written; SeaweedFS refuses to
    # (InvalidRequest), so the listing that would name one is made here.
    listed = storage.list_uris(root) + [f"{root}/../../escaped.txt"]
    monkeypatch.setattr(storage, "list_uris", lambda prefix: listed)
    target = tmp_path / "a" / "b"
    with pytest.raises(StorageError, match="leads outside"):
        storage.download_dir(root, target)
    assert not (tmp_path / "escaped.txt").exists() and not target.exists()


def test_publishing_on_s3_switches_readers_and_removes_old_versions(s3_bucket):
    from entityclip import publish

    uri = f"s3://{s3_bucket}/published"
    versions = []
    for content in (b"1", b"2", b"3"):
        with publish.publishing(uri) as version:
            storage.write_bytes(storage.join(version, "part", "data.bin"), content)
            if versions:  # mid-publish, readers still get the previous version
                assert storage.read_bytes(storage.join(publish.current(uri), "part", "data.bin")) != content
        versions.append(version.rsplit("/", 1)[-1])
        assert storage.read_bytes(storage.join(publish.current(uri), "part", "data.bin")) == content
    assert storage.list_children(uri) == {publish.POINTER, *versions[1:]}


def test_s3_missing_key_and_bucket_are_clear_errors(s3_bucket):
    with pytest.raises(StorageError, match="no such object"):
        storage.read_bytes(f"s3://{s3_bucket}/does/not/exist")
    with pytest.raises(StorageError):
        storage.read_bytes("s3://no-such-bucket-here/x")


def test_unreachable_s3_fails_fast_with_a_clear_error(monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    start = time.time()
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        storage.read_bytes("s3://bucket/key")
    assert time.time() - start < 60


def test_stages_run_with_the_storage_root_on_s3(s3_bucket, ray_session, trained_run):
    from entityclip.pipeline import stage_data, stage_evaluate, stage_explain, stage_index
    from tests.conftest import tiny_config

    root = f"s3://{s3_bucket}/pipeline-run"
    cfg = tiny_config(root)
    stage_data(cfg, progress=False)
    stats = stage_explain(cfg, progress=False)  # Ray Data actors read and write S3
    assert storage.read_parquet(f"{root}/explanations.parquet").num_rows == stats.samples == 88
    assert not storage.list_uris(f"{root}/explanations.parts")

    # The session's trained checkpoint, published to S3, is loaded from there by the index actors.
    local_ckpt = storage.local_path(trained_run["train"].checkpoint_uri)
    storage.upload_dir(local_ckpt, f"{root}/checkpoints/entityclip")
    stage_index(cfg)
    metrics = stage_evaluate(cfg)
    # the index alone, and two-stage with entityclip's GI-ITM re-ranker (which reads the stored tokens)
    # test_composed is never re-ranked: a composed query is not an (image, text) pair
    assert set(metrics) == {f"{r}{s}" for r in ("", "itm/") for s in ("test_seen", "test_unseen", "test_compositional")} \
        | {"test_composed"}
    assert storage.read_json(f"{root}/eval/entityclip.json") == metrics

    # The in-process retrieval API reads checkpoint, FAISS index and entities from S3 too.
    from entityclip import Retriever

    retriever = Retriever.load(root, config=cfg)
    answer = retriever.search_text("Velmora Rovers lift the cup", k=3)
    assert len(answer["results"]) == 3 and answer["model"]["variant"] == "entityclip"
    assert "s3://" not in json.dumps(answer)  # answers name no storage location
    # The search page's thumbnails come from the S3 gallery.
    hit = answer["results"][0]
    stored = {s["sample_id"]: s["image_uri"] for s in storage.read_parquet(f"{root}/data/samples.parquet").to_pylist()}
    assert stored[hit["sample_id"]].startswith("s3://")
    assert retriever.gallery_image(hit["sample_id"]) == (storage.read_bytes(stored[hit["sample_id"]]), "image/png")
