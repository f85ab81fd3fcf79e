"""Ray Train DDP on 2 CPU workers, tracked in a real MLflow server over HTTP."""

import pytest
from mlflow.tracking import MlflowClient

from entityclip import publish, storage
from entityclip.errors import TrackingError
from entityclip.models.checkpoint import load_model, read_meta
from entityclip.config import TrackingConfig
from entityclip.tracking import Tracker, artifact_root, resolve_uri


def test_training_logs_params_step_metrics_checkpoint_and_a_registered_mlflow_model(trained_run, mlflow_server):
    result = trained_run["train"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["model.variant"] == "entityclip"
    history = client.get_metric_history(result.run_id, "train/loss")
    assert len(history) >= 2 and [m.step for m in history] == sorted(m.step for m in history)
    assert {a.path for a in client.list_artifacts(result.run_id, "checkpoint")} == {
        "checkpoint/model.safetensors", "checkpoint/model.json"}
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(result.run_id, "model")}
    version = client.get_model_version("entityclip-entityclip", trained_run["model"].version)
    assert version.run_id == result.run_id


def test_checkpoint_is_stored_and_loadable(trained_run):
    uri = trained_run["train"].checkpoint_uri
    assert storage.exists(storage.join(publish.current(uri), "model.safetensors"))
    assert read_meta(uri)["model"]["variant"] == "entityclip"
    assert load_model(uri).image_size == 32


def test_evaluation_reports_recall_per_split_and_direction(trained_run, mlflow_server):
    metrics = trained_run["metrics"]
    # the index alone, and two-stage with the model's re-ranker (rerank_k candidates re-scored)
    # test_composed is never re-ranked: a composed query is not an (image, text) pair
    assert set(metrics) == {f"{r}{s}" for r in ("", "itm/") for s in ("test_seen", "test_unseen", "test_compositional")} \
        | {"test_composed"}
    assert metrics["itm/test_unseen"]["rerank_k"] == trained_run["cfg"].serve.rerank_k
    for split in metrics.values():
        for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
            assert 0.0 <= split[key] <= 100.0
        assert split["i2t_r1"] <= split["i2t_r5"] <= split["i2t_r10"]
        assert split["rsum"] == pytest.approx(sum(split[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
        assert split["rsum_ci_low"] <= split["rsum"] <= split["rsum_ci_high"]
    logged = MlflowClient(mlflow_server).get_run(trained_run["train"].run_id).data.metrics
    assert logged["test_unseen/t2i_r1"] == pytest.approx(metrics["test_unseen"]["t2i_r1"])
    assert logged["itm/test_unseen/rsum"] == pytest.approx(metrics["itm/test_unseen"]["rsum"])


def test_unreachable_tracking_server_is_a_clear_error():
    from tests.conftest import free_port

    with pytest.raises(TrackingError, match="unreachable"):
        Tracker(f"http://127.0.0.1:{free_port()}")


def test_the_local_default_store_keeps_artifacts_under_the_run_root(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's own default would be ./mlruns here
    cfg, root = TrackingConfig(), tmp_path / "run"
    tracker = Tracker(resolve_uri(cfg, root), artifact_root(cfg, root))
    run_id = tracker.start_run("local", "r1", {"a": 1})
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.json").write_text("{}")
    tracker.log_artifacts(run_id, tmp_path / "ckpt", "checkpoint")
    assert (root / "mlartifacts" / run_id / "artifacts" / "checkpoint" / "model.json").is_file()
    assert list(elsewhere.iterdir()) == []


def test_a_run_starts_when_another_process_created_its_experiment_first(mlflow_server, monkeypatch):
    """Concurrent sweep trials both look the experiment up, find none, and create it: the
    second create is refused, and the run goes into the experiment the first one made."""
    first, second = Tracker(mlflow_server), Tracker(mlflow_server)
    first.start_run("created-concurrently", "a", {})
    lookup, lookups = second.client.get_experiment_by_name, []

    def not_there_yet(name: str):  # the first lookup ran before the other process created it
        lookups.append(name)
        return None if len(lookups) == 1 else lookup(name)

    monkeypatch.setattr(second.client, "get_experiment_by_name", not_there_yet)
    run_id = second.start_run("created-concurrently", "b", {})
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("created-concurrently")
    assert MlflowClient(mlflow_server).get_run(run_id).info.experiment_id == experiment.experiment_id
