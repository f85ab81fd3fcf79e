"""Sweeps: a Ray Tune grid over config fields where every trial trains, evaluates and registers
like `entityclip train`, as one MLflow run tagged with its values; compare ranks the sweep and
promotes its best trial. Slow (two trainings, run at once)."""

import pytest
from mlflow.tracking import MlflowClient

from entityclip.compare import collect, promote_best
from entityclip.errors import ConfigError
from entityclip.pipeline import stage_data, stage_explain
from entityclip.sweep import parse_space, run_sweep
from tests.conftest import tiny_config


@pytest.mark.slow
def test_a_grid_sweep_tracks_each_trial_and_promotes_the_best(ray_session, mlflow_server, tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=1", "train.num_workers=1", f"tracking.uri={mlflow_server}",
                      "tracking.experiment=sweeps", "tracking.registered_model=sweeps")  # no champion yet
    stage_data(cfg, progress=False)
    stage_explain(cfg, progress=False)

    result = run_sweep(cfg, ["train.lr=0.001,0.003"], "test_unseen/rsum", concurrent=2, name="lr-grid", progress=False)

    assert result.failed == [] and len(result.trials) == 2
    assert sorted(t["params"]["train.lr"] for t in result.trials) == ["0.001", "0.003"]
    scores = [t["test_unseen/rsum"] for t in result.trials]
    assert scores == sorted(scores, reverse=True)  # best first
    client = MlflowClient(mlflow_server)
    for t in result.trials:
        run = client.get_run(t["run_id"])
        assert run.data.tags["sweep"] == "lr-grid" and run.data.tags["param.train.lr"] == t["params"]["train.lr"]
        assert float(run.data.params["train.lr"]) == float(t["params"]["train.lr"])  # trained with its value
        assert run.data.metrics["test_unseen/rsum"] == pytest.approx(t["test_unseen/rsum"])
        assert t["test_unseen/rsum_ci_low"] <= t["test_unseen/rsum"] <= t["test_unseen/rsum_ci_high"]

    rows = collect(cfg, sweep="lr-grid")
    assert {r["params"] for r in rows} == {"train.lr=0.001", "train.lr=0.003"}
    promoted = promote_best(cfg, "test_unseen/rsum", sweep="lr-grid")
    assert promoted["promoted"]
    champion = client.get_model_version_by_alias(promoted["model"], "champion")
    assert champion.run_id in {t["run_id"] for t in result.trials if t["test_unseen/rsum"] == scores[0]}  # a best trial (ties happen)


@pytest.mark.parametrize("spec, message", [
    ("train.lr", "must look like"),
    ("train.lr=loguniform:1e-4", "needs LOW:HIGH"),
    ("train.no_such_field=1,2", "unknown field"),
])
def test_a_malformed_sweep_is_a_one_line_error_before_any_trial(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        run_sweep(tiny_config(tmp_path), [spec], "test_unseen/rsum")


def test_grids_and_distributions_become_a_tune_search_space():
    space = parse_space(["train.lr=0.001,0.003", "train.explanation_weight=uniform:0.5:1.0"])
    assert space["train.lr"] == {"grid_search": ["0.001", "0.003"]}
    assert 0.5 <= space["train.explanation_weight"].sample() <= 1.0
