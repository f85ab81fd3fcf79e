"""Checkpoints and gallery indexes publish atomically: a writer killed at any step of a publish
leaves the previous version current, whole and servable, and the next publish completes and
clears what the killed one left."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from entityclip import publish, storage
from entityclip.config import IndexConfig, ModelConfig
from entityclip.errors import StorageError
from entityclip.index import EmbeddingIndex, write_index
from entityclip.models import build_model
from entityclip.retrieval import Limits, Retriever
from entityclip.models.checkpoint import load_model, publish_checkpoint, save_checkpoint

MODEL = ModelConfig(variant="clip_finetune", image_size=32, patch_size=8, width=32, embed_dim=32, layers=1, heads=2,
                    context_length=32)


def gallery(tag: str, rows: int = 12) -> dict[str, pa.Table]:
    """Index tables whose sample ids and texts say which build they come from."""
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    tables = {}
    for kind in ("images", "texts"):
        emb = rng.normal(size=(rows, MODEL.embed_dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        tables[kind] = pa.table({"sample_id": [f"{tag}-{i}" for i in range(rows)],
                                 "image_uri": [f"/gallery/{tag}-{i}.png" for i in range(rows)],
                                 "text": [f"{tag} text {i}" for i in range(rows)],
                                 "split": ["test"] * rows, "embedding": list(emb)})
    return tables


def model_folder(tmp: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(build_model(MODEL), tmp / f"model-{seed}")


def publish_killed_at(step: int | None, what: str, uri: str, source: str) -> None:
    """Run in a child process: publish, SIGKILLing itself just before storage operation number
    `step` (writes and deletes, counted from 0). Without a step, exit with the count."""
    done = 0

    def step_then(fn):
        def wrapped(*args, **kwargs):
            nonlocal done
            if done == step:
                os.kill(os.getpid(), signal.SIGKILL)
            done += 1
            return fn(*args, **kwargs)
        return wrapped

    storage.write_bytes = step_then(storage.write_bytes)
    storage.delete_tree = step_then(storage.delete_tree)
    if what == "checkpoint":
        publish_checkpoint(source, uri)
    else:
        write_index(uri, gallery(source), IndexConfig())
    os._exit(100 + done)


def run_child(*args) -> int:
    ctx = multiprocessing.get_context("forkserver")  # a single-threaded parent: safe to fork from
    child = ctx.Process(target=publish_killed_at, args=args)
    child.start()
    child.join(60)
    return child.exitcode


def test_each_publish_switches_readers_to_it_and_removes_all_but_the_one_it_replaced(tmp_path):
    uri = str(tmp_path / "index")
    versions = []
    for tag in ("a", "b", "c"):
        write_index(uri, gallery(tag), IndexConfig())
        versions.append(Path(publish.current(uri)).name)
        assert EmbeddingIndex.load(uri).meta["images"][0]["sample_id"] == f"{tag}-0"
    # The one replaced stays for readers that resolved it a moment before; older ones go.
    assert storage.list_children(uri) == {publish.POINTER, *versions[1:]}


def test_a_failed_publish_removes_its_folder_and_changes_nothing(tmp_path):
    uri = str(tmp_path / "ckpt")
    publish_checkpoint(model_folder(tmp_path, 0), uri)
    before = storage.list_children(uri)
    with pytest.raises(RuntimeError), publish.publishing(uri) as version:
        storage.write_bytes(storage.join(version, "model.json"), b"{}")
        raise RuntimeError("the writer failed")
    assert storage.list_children(uri) == before


def publish_one(what: str, uri: str, source: str) -> None:
    if what == "index":
        write_index(uri, gallery(source), IndexConfig())
    else:
        publish_checkpoint(source, uri)


def same_weights(uri: str, folder: str) -> bool:
    want = load_model(folder).state_dict()
    return all(torch.equal(v, want[k]) for k, v in load_model(uri).state_dict().items())


@pytest.mark.parametrize("what", ["checkpoint", "index"])
def test_a_writer_killed_at_any_step_leaves_the_previous_version_usable(tmp_path, what):
    multiprocessing.get_context("forkserver").set_forkserver_preload(["tests.test_publish"])
    if what == "index":
        older, old, new = "older", "old", "new"
    else:
        older, old, new = (str(model_folder(tmp_path, seed)) for seed in range(3))

    def start(uri: str) -> None:  # two versions already published: a publish then removes one
        publish_one(what, uri, older)
        publish_one(what, uri, old)

    start(str(tmp_path / "count"))
    steps = run_child(None, what, str(tmp_path / "count"), new) - 100
    assert steps == {"checkpoint": 2, "index": 4}[what] + 2  # its files, the switch, one removal
    for step in range(steps):
        uri = str(tmp_path / f"{what}-{step}")
        start(uri)
        assert run_child(step, what, uri, new) == -signal.SIGKILL
        switched = step > steps - 2  # killed after the pointer moved
        if what == "index":
            index = EmbeddingIndex.load(uri)
            served = new if switched else old
            assert {m["sample_id"].split("-")[0] for m in index.meta["images"]} == {served}
            retriever = Retriever(build_model(MODEL).eval(), index, None, Limits(), {"variant": "clip_finetune"})
            hits = retriever.search_text("a query", k=3, explanation="")["results"]
            assert len(hits) == 3 and all(h["sample_id"].startswith(served) for h in hits)
        else:
            assert same_weights(uri, new if switched else old)
        # The next publish completes, and clears what the killed writer left.
        publish_one(what, uri, older)
        assert len(storage.list_children(uri)) == 3
        if what == "index":
            assert EmbeddingIndex.load(uri).meta["texts"][0]["text"] == "older text 0"
        else:
            assert same_weights(uri, older)


def test_a_pointer_naming_a_path_outside_is_refused(tmp_path):
    uri = str(tmp_path / "ckpt")
    storage.write_json(storage.join(uri, publish.POINTER), {"version": "../../elsewhere"})
    with pytest.raises(StorageError, match="names no valid version"):
        publish.current(uri)


def test_an_unversioned_checkpoint_folder_still_loads(tmp_path):
    folder = model_folder(tmp_path, 0)
    assert publish.current(str(folder)) == str(folder)
    assert load_model(str(folder)).image_size == 32


def test_an_unversioned_checkpoint_is_read_as_it_is_until_the_first_publish_replaces_it(tmp_path):
    uri = tmp_path / "ckpt"
    model_folder(tmp_path, 0).rename(uri)  # the layout before atomic publication: files in the folder
    assert same_weights(str(uri), str(uri))
    new = model_folder(tmp_path, 1)
    publish_checkpoint(new, str(uri))
    assert same_weights(str(uri), str(new))
    assert storage.list_children(str(uri)) == {publish.POINTER, Path(publish.current(str(uri))).name}
