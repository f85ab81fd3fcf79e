"""The model registry: every training run's matcher is an MLflow Model that any MLflow user loads
by name and alias, from a tracking server (artifacts on S3) or the local default store; Serve
deploys a registered version only when it can search."""

import base64

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from entityclip import Retriever, storage
from entityclip.errors import ConfigError, InputError, TrackingError
from entityclip.paths import RunPaths
from entityclip.pipeline import stage_lm
from entityclip.registry import register_run, save_package
from entityclip.serving.app import check_servable
from entityclip.tracking import Tracker, tracker_for
from tests.conftest import MLFLOW_ARTIFACTS, tiny_config


@pytest.fixture(scope="module")
def champion(trained_run, mlflow_server):
    """The session run's version under alias champion, loaded with MLflow's own API over HTTP."""
    ref = trained_run["model"]
    Tracker(mlflow_server).set_alias(ref.name, ref.version, "champion")
    mlflow.set_tracking_uri(mlflow_server)
    try:
        yield mlflow.pyfunc.load_model(f"models:/{ref.name}@champion")
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def in_process(trained_run):
    return Retriever.load(str(trained_run["root"]), config=trained_run["cfg"])


def test_the_champion_embeds_texts_as_the_trained_model_does(champion, in_process, unseen_sample):
    texts = [unseen_sample["text"], "Velmora Rovers lift the cup"]
    embeddings = champion.predict(pd.DataFrame({"text": texts}))
    assert embeddings.shape == (2, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, in_process.embed_texts(texts)[0], atol=1e-5)
    # A caller's own explanation is read instead of the packaged engine's.
    own = champion.predict(pd.DataFrame({"text": texts[:1], "explanation": ["a tall red tower"]}))
    np.testing.assert_allclose(own, in_process.embed_texts(texts[:1], ["a tall red tower"])[0], atol=1e-5)


def test_the_champion_embeds_base64_images_as_the_trained_model_does(champion, in_process, unseen_sample):
    image = storage.read_bytes(unseen_sample["image_uri"])
    rows = pd.DataFrame({"image_base64": [base64.b64encode(image).decode(), None],
                         "text": [None, unseen_sample["text"]]})
    embeddings = champion.predict(rows)
    np.testing.assert_allclose(embeddings[0], in_process.embed_images([image])[0], atol=1e-5)
    np.testing.assert_allclose(embeddings[1], in_process.embed_texts([unseen_sample["text"]])[0][0], atol=1e-5)


def test_a_model_explained_by_the_world_lm_carries_it_and_explains_text_rows_itself(trained_run, tmp_path):
    root = tmp_path / "world"
    (root / "data").mkdir(parents=True)
    (root / "data" / "entities.parquet").write_bytes((trained_run["root"] / "data" / "entities.parquet").read_bytes())
    cfg = tiny_config(root, "explain.engine=vllm", "explain.model=world", "explain.world_lm_steps=20",
                      "explain.max_tokens=8")
    stage_lm(cfg)
    package = save_package(cfg, RunPaths.for_config(trained_run["cfg"]).checkpoint("entityclip"), None,
                           str(root / "data" / "entities.parquet"), tmp_path / "model")
    assert (package / "artifacts" / "lm" / "config.json").is_file()
    model = mlflow.pyfunc.load_model(str(package))
    retriever = model.unwrap_python_model().retriever
    text = "Velmora Rovers lift the cup"
    written = retriever.explain([text])[0]  # transformers on the packaged LM (no vLLM in this interpreter)
    assert written.strip()
    np.testing.assert_allclose(model.predict(pd.DataFrame({"text": [text]})), retriever.embed_texts([text], [written])[0],
                               atol=1e-5)


def test_the_model_declares_its_signature_and_example(champion):
    signature = champion.metadata.signature
    assert signature.inputs.input_names() == ["text", "explanation", "image_base64"]
    assert not any(spec.required for spec in signature.inputs.inputs)
    assert signature.outputs.inputs[0].shape == (-1, 32)
    assert champion.metadata.saved_input_example_info is not None


@pytest.mark.parametrize("rows, message", [
    ({"tetx": ["a misspelt column"]}, "none of the columns"),
    ({"text": ["  "]}, "text is empty"),
    ({"text": ["both"], "image_base64": ["aGk="]}, "exactly one of text or image_base64"),
    ({"image_base64": ["not base64!"]}, "not valid base64"),
    ({"image_base64": [base64.b64encode(b"not an image").decode()]}, "image"),
])
def test_bad_rows_are_one_line_errors(champion, rows, message):
    with pytest.raises(InputError, match=message):
        champion.predict(pd.DataFrame(rows))


def test_the_model_and_its_index_are_stored_on_s3_through_the_tracking_server(trained_run, s3_bucket):
    run_id = trained_run["model"].run_id
    stored = [u for u in storage.list_uris(f"s3://{s3_bucket}/{MLFLOW_ARTIFACTS}") if f"/{run_id}/" in u]
    for part in ("model/MLmodel", "model/artifacts/checkpoint/model.safetensors",
                 "model/artifacts/index/images.faiss", "model/artifacts/entities.parquet"):
        assert any(u.endswith(f"/artifacts/{part}") for u in stored), part


def test_the_local_default_store_registers_and_loads_by_alias(trained_run, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "local", "tracking.experiment=local")
    tracker = tracker_for(cfg)  # sqlite under the run root, artifacts in <root>/mlartifacts
    run_id = tracker.start_run("local", "registered-locally", {})
    paths = RunPaths.for_config(trained_run["cfg"])
    ref = register_run(tracker, run_id, cfg, paths.checkpoint("entityclip"), paths.index("entityclip"), paths.entities)
    tracker.set_alias(ref.name, ref.version, "champion")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    mlflow.set_tracking_uri(tracker.uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{ref.name}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.predict(pd.DataFrame({"text": ["Velmora Rovers lift the cup"]})).shape == (1, 32)
    assert list((tmp_path / "local" / "mlartifacts").rglob("MLmodel")) and not list(elsewhere.iterdir())


def test_serving_resolves_an_alias_to_its_pinned_version(trained_run, mlflow_server):
    ref = trained_run["model"]
    Tracker(mlflow_server).set_alias(ref.name, ref.version, "pinned")
    cfg = tiny_config(trained_run["root"], f"tracking.uri={mlflow_server}", f"serve.model=models:/{ref.name}@pinned")
    assert check_servable(cfg, "entityclip") == ref


@pytest.mark.parametrize("model, error, message", [
    ("entityclip-entityclip@champion", ConfigError, "not a registry URI"),
    ("models:/entityclip-entityclip@no-such-alias", TrackingError, "no-such-alias"),
    ("models:/no-such-model/1", TrackingError, "no-such-model"),
])
def test_serving_an_unknown_model_is_a_one_line_error(trained_run, mlflow_server, model, error, message):
    cfg = tiny_config(trained_run["root"], f"tracking.uri={mlflow_server}", f"serve.model={model}")
    with pytest.raises(error, match=message):
        check_servable(cfg, "entityclip")


def test_a_version_without_a_gallery_index_is_not_servable(trained_run, mlflow_server):
    cfg = tiny_config(trained_run["root"], f"tracking.uri={mlflow_server}", "tracking.experiment=tests")
    paths = RunPaths.for_config(cfg)
    tracker = Tracker(mlflow_server)
    run_id = tracker.start_run("registry-tests", "trained-with-no-eval", {})
    ref = register_run(tracker, run_id, cfg, paths.checkpoint("entityclip"), None, paths.entities)
    cfg.serve.model = ref.uri
    with pytest.raises(ConfigError, match="no gallery index"):
        check_servable(cfg, "entityclip")


def test_loading_a_version_leaves_no_temporary_folder(trained_run, mlflow_server, tmp_path, monkeypatch):
    import tempfile

    from entityclip.registry import load_retriever

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    retriever = load_retriever(Tracker(mlflow_server), trained_run["model"], trained_run["cfg"].serve, explain=False)
    assert len(retriever.index) == 88
    assert list(scratch.iterdir()) == []
