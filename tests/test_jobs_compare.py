"""Operating: Ray Jobs submission to the running cluster, and tracked run comparison."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from entityclip import storage
from entityclip.compare import collect, compare_runs
from entityclip.errors import EntityClipError
from entityclip.jobs import ray_token, submit_job
from tests.test_cli import run_cli
from entityclip.pipeline import stage_evaluate, stage_index, stage_register, stage_train, with_variant

REPO = Path(__file__).resolve().parent.parent


def test_a_stage_submitted_as_a_ray_job_runs_on_the_cluster(ray_session, tmp_path):
    root = tmp_path / "job-run"
    # The cluster's interpreter: here this venv's (a cluster image has the platform on PATH).
    entrypoint = (f"{sys.executable} jobs/data.py --config configs/tiny.yaml --root {root} --no-progress && "
                  f"{sys.executable} jobs/explain.py --config configs/tiny.yaml --root {root} --no-progress")
    out = submit_job(ray_session.dashboard_address, entrypoint, str(REPO), timeout_s=300)
    assert out["status"] == "SUCCEEDED"
    assert storage.read_parquet(str(root / "explanations.parquet")).num_rows == 88  # 8 entities x 6, 8 compositional, 32 composed
    # The job used the cluster's own credentials: the submitter's were not copied into the job's
    # metadata, which the Jobs API and the dashboard show to anyone who can read them.
    from ray.job_submission import JobSubmissionClient

    shown = JobSubmissionClient(ray_session.dashboard_address, headers={"Authorization": f"Bearer {ray_token()}"})
    env = shown.get_job_info(out["job_id"]).runtime_env.get("env_vars", {})
    assert "AWS_ENDPOINT_URL" in env and not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(env)


def submit_cli(address: str, home: Path, **env: str):
    """`entityclip submit` as a user runs it, with only the Ray token settings in `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run([str(Path(sys.executable).parent / "entityclip"), "submit", "--address", address,
                           "--working-dir", str(REPO), f"{sys.executable} -c \"print('hello from the job')\""],
                          capture_output=True, text=True, timeout=300, env={**clean, "HOME": str(home), **env})


def test_submitting_to_a_cluster_with_token_auth_needs_its_token(ray_session, tmp_path):
    assert os.environ.get("RAY_AUTH_MODE") == "token"  # Ray >= 2.59 turns it on for a local cluster
    address = ray_session.dashboard_address
    missing = submit_cli(address, tmp_path)  # no RAY_AUTH_TOKEN and no ~/.ray/auth_token
    assert missing.returncode == 2 and "requires a token" in missing.stderr and "Traceback" not in missing.stderr
    wrong = submit_cli(address, tmp_path, RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(ray_token())  # Ray's default token file
    given = submit_cli(address, tmp_path)
    assert given.returncode == 0, given.stderr[-2000:]
    assert "SUCCEEDED" in given.stdout and "hello from the job" in given.stdout


def test_a_failing_job_is_reported_with_its_logs(ray_session, tmp_path):
    with pytest.raises(EntityClipError, match="FAILED") as info:
        submit_job(ray_session.dashboard_address, f"{sys.executable} jobs/index.py --root {tmp_path}/none", str(REPO), timeout_s=120)
    assert "run `entityclip train` first" in str(info.value)


def test_unreachable_jobs_api_is_a_clear_error():
    from tests.conftest import free_port

    with pytest.raises(EntityClipError, match="cannot reach the Ray Jobs API"):
        submit_job(f"http://127.0.0.1:{free_port()}", "true")


def test_compare_tabulates_and_plots_every_evaluated_variant(trained_run, tmp_path):
    # The zero-shot baseline goes through the same train/index/evaluate path, without training.
    cfg = with_variant(trained_run["cfg"], "clip_zeroshot")
    result = stage_train(cfg, progress=False)
    stage_index(cfg)
    stage_evaluate(cfg, result.run_id)
    stage_register(cfg, result.run_id)

    rows = collect(cfg)
    assert {"entityclip", "clip_zeroshot"} <= {r["variant"] for r in rows}
    assert all(r["test_unseen/rsum"] is not None for r in rows)
    text, (plot, report) = compare_runs(cfg, str(tmp_path / "compare.png"), str(tmp_path / "compare.html"))
    assert "clip_zeroshot" in text and "entityclip" in text
    assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(report).read_text()
    runs_table = page.split("</table>")[0]  # a seed-group table may follow
    assert runs_table.count("<tr>") == len(rows) + 1 and "clip_zeroshot" in page
    assert "<small>[" in runs_table  # each figure with its 95% interval
    assert 'src="data:image/png;base64,' in page  # the chart travels inside the file


def test_compare_promotes_the_best_run_and_promote_sets_any_alias(trained_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    from entityclip.compare import collect, promote_best

    cfg = trained_run["cfg"]
    client = MlflowClient(mlflow_server)
    # A run that evaluated but registered no model has nothing to promote, however well it scored.
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    evaluated_only = client.create_run(experiment, tags={"variant": "entityclip"}, run_name="evaluated-only").info.run_id
    client.log_metric(evaluated_only, "test_unseen/rsum", 600.0)
    try:
        rows = [r for r in collect(cfg) if r["test_unseen/rsum"] is not None]
        assert any(r["reranker"] == "itm" and not r["served"] for r in rows)  # entityclip +itm: evaluated, not served
        registered = [r for r in rows if r["served"] and client.search_model_versions(f"run_id = '{r['run_id']}'")]
        best = max(registered, key=lambda r: r["test_unseen/rsum"])
        # Forced: whether the best beats a champion that other tests may have set is test_evidence's subject.
        promoted = promote_best(cfg, "test_unseen/rsum", force=True)
        assert promoted["promoted"]
        assert client.get_model_version_by_alias(promoted["model"], "champion").run_id == best["run_id"]
    finally:
        client.delete_run(evaluated_only)

    version = trained_run["model"].version
    result = run_cli("promote", "entityclip-entityclip", version, "--alias", "staging",
                     "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=tests")
    assert result.returncode == 0, result.stderr
    assert client.get_model_version_by_alias("entityclip-entityclip", "staging").version == version
    missing = run_cli("promote", "entityclip-entityclip", "999", "--set", f"tracking.uri={mlflow_server}")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr and "version 999" in missing.stderr


def test_promoting_by_an_unknown_metric_is_a_config_error(trained_run):
    from entityclip.compare import promote_best
    from entityclip.errors import ConfigError

    with pytest.raises(ConfigError, match="choose one of"):
        promote_best(trained_run["cfg"], "accuracy")
