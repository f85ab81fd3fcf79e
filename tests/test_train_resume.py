"""Training survives real worker deaths: Ray Train restores the last checkpoint within a run, and
`entityclip train --resume` continues an interrupted run in a new invocation. Either way the
MLflow run has exactly one value per step and the progress never passes its total. A worker is
killed for real (SIGKILL) through the trainer's fault-injection variable. Slow (four trainings)."""

import json
import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from entityclip import storage
from entityclip.pipeline import stage_data, stage_explain, stage_train
from entityclip.train.trainer import KILL_WORKER_ENV
from tests.conftest import TINY, tiny_config
from tests.test_cli import ENTITYCLIP

pytestmark = pytest.mark.slow

EPOCHS = 4
TRAIN = [f"train.epochs={EPOCHS}", "train.checkpoint_every_epochs=1", "train.log_every_steps=1"]


@pytest.fixture(scope="module")
def data_root(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    stage_data(tiny_config(root), progress=False)
    stage_explain(tiny_config(root), progress=False)
    return root


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_one_value_per_step(client: MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/epoch_loss", "train/loss", "train/lr"):
        assert steps(client, run_id, key) == list(range(1, EPOCHS + 1)), key  # one step per epoch here
    assert json.loads(run.data.tags["progress"])["epoch"] == EPOCHS


def test_a_worker_killed_mid_run_is_restored_from_the_checkpoint(data_root, mlflow_server, monkeypatch):
    cfg = tiny_config(data_root, *TRAIN, "train.max_failures=1", f"tracking.uri={mlflow_server}",
                      "tracking.experiment=restore")
    monkeypatch.setenv(KILL_WORKER_ENV, "2")
    result = stage_train(cfg, progress=False)
    client = MlflowClient(mlflow_server)
    assert_one_value_per_step(client, result.run_id)
    assert result.metrics["epoch"] == EPOCHS - 1 and result.train_loss > 0


def test_train_resume_continues_the_interrupted_run_in_a_new_invocation(data_root, mlflow_server, cluster_env):
    args = [ENTITYCLIP, "train", "--no-progress", "--no-eval", *(f"--set={o}" for o in [
        *TINY, *TRAIN, "train.max_failures=0", f"storage.root={data_root}", f"tracking.uri={mlflow_server}",
        "tracking.experiment=resume"])]
    killed = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**cluster_env, KILL_WORKER_ENV: "2"})
    assert killed.returncode == 2 and "Traceback" not in killed.stderr, killed.stderr[-2000:]
    assert "entityclip train --resume" in killed.stderr
    state = storage.read_json(str(data_root / "training" / "entityclip.json"))
    client = MlflowClient(mlflow_server)
    assert state["status"] == "running" and client.get_run(state["run_id"]).info.status == "FAILED"
    assert steps(client, state["run_id"], "train/epoch_loss") == [1, 2]  # epochs 0 and 1 ran

    changed = subprocess.run([*args, "--resume", "--set=train.lr=0.5"], capture_output=True, text=True, timeout=300,
                             env=cluster_env)
    assert changed.returncode == 2 and "train.lr" in changed.stderr  # a resume must not change the recipe

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300, env=cluster_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["train"]["run_id"] == state["run_id"], resumed.stdout[:1500]
    assert_one_value_per_step(client, state["run_id"])
    assert storage.read_json(str(data_root / "training" / "entityclip.json"))["status"] == "finished"

    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300, env=cluster_env)
    assert again.returncode == 2 and "no interrupted training" in again.stderr


class RunsCode:
    """A pickle that runs a command when loaded: what a writer of the run root could plant."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_resume_state_that_would_run_code_is_refused_without_running_it(tmp_path):
    import torch

    from entityclip.errors import StorageError
    from entityclip.train.loop import load_train_state

    plain, planted, marker = tmp_path / "plain.pt", tmp_path / "planted.pt", tmp_path / "ran"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, plain)
    assert load_train_state(plain, torch.device("cpu"))["epoch"] == 3
    torch.save({"model": {"w": torch.ones(2)}, "epoch": RunsCode(marker)}, planted)
    with pytest.raises(StorageError, match="refused to load"):
        load_train_state(planted, torch.device("cpu"))
    assert not marker.exists()
