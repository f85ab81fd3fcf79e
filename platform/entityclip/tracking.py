"""MLflow tracking through MlflowClient with explicit run ids, so the driver and the rank-0
Ray Train worker log into the same run without sharing global state."""

from __future__ import annotations

import os
import time
from pathlib import Path

import requests

from entityclip.config import PipelineConfig, TrackingConfig
from entityclip.errors import TrackingError

# Where an evaluated run keeps every test query's result (evaluate.QueryResults tables).
QUERY_RESULTS_ARTIFACT = "evaluation/queries.parquet"
# The tag naming the explanations a training run read (pipeline.explanations_fingerprint).
EXPLANATIONS_TAG = "explanations_sha256"


def resolve_uri(tracking_cfg: TrackingConfig, local_dir: str | Path) -> str:
    """The configured URI, or a local sqlite store in `local_dir` (the embedded default)."""
    if tracking_cfg.uri:
        return tracking_cfg.uri
    path = Path(local_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def artifact_root(tracking_cfg: TrackingConfig, local_dir: str | Path) -> str | None:
    """Where new experiments keep artifacts: beside the local default store, since MLflow would
    otherwise put them in `./mlruns` of whatever folder the command ran in. A tracking server
    decides for itself (None)."""
    return None if tracking_cfg.uri else (Path(local_dir).resolve() / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as exc:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({type(exc).__name__})") from None
    if response.status_code != 200:
        raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {response.status_code}")


class Tracker:
    def __init__(self, uri: str, artifact_root: str | None = None):
        # Fail fast rather than retry for minutes when the server goes away mid-run.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # MLflow writes the run's URL to stdout when a run ends; our commands' stdout is JSON.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # Paired comparisons download small tables: no progress bar for each.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.tracking import MlflowClient

        check_reachable(uri)
        self.uri = uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _call(self, what: str, fn):
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except MlflowException as exc:
            raise TrackingError(f"MLflow ({self.uri}) refused to {what}: {exc.message}") from None
        except requests.RequestException as exc:
            raise TrackingError(f"MLflow ({self.uri}) unreachable while trying to {what} ({exc})") from None

    def start_run(self, experiment: str, run_name: str, params: dict) -> str:
        def _start():
            run = self.client.create_run(self._experiment_id(experiment), run_name=run_name)
            return run.info.run_id

        run_id = self._call("start a run", _start)
        self.log_params(run_id, params)
        return run_id

    def _experiment_id(self, experiment: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(experiment)
        if exp:
            return exp.experiment_id
        try:
            return self.client.create_experiment(experiment, artifact_location=self.artifact_root)
        except MlflowException as exc:
            # Concurrent sweep trials both found no experiment; the other created it first.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(experiment).experiment_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log params", lambda chunk=items[i:i + 100]: self.client.log_batch(run_id, params=chunk))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._call("log metrics", lambda: self.client.log_batch(run_id, metrics=items))

    def last_steps(self, run_id: str, prefix: str = "") -> dict[str, int]:
        """The last step logged of each of the run's metrics whose key starts with `prefix`."""
        def _read():
            keys = [k for k in self.client.get_run(run_id).data.metrics if k.startswith(prefix)]
            return {k: max(m.step for m in self.client.get_metric_history(run_id, k)) for k in keys}

        return self._call("read the run's metrics", _read)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call("set a tag", lambda k=k, v=v: self.client.set_tag(run_id, k, v))

    def tags(self, run_id: str) -> dict[str, str]:
        return self._call("read the run", lambda: self.client.get_run(run_id).data.tags)

    def params(self, run_id: str) -> dict[str, str]:
        return self._call("read the run", lambda: self.client.get_run(run_id).data.params)

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
        self._call("log artifacts", lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path))

    def log_table(self, run_id: str, table, artifact_file: str) -> None:
        """A pyarrow table as the run's Parquet artifact `artifact_file` (replacing any before)."""
        import tempfile

        import pyarrow.parquet as pq

        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="entityclip-table-") as d:
            pq.write_table(table, Path(d) / name)
            self._call("log a table", lambda: self.client.log_artifact(run_id, str(Path(d) / name), folder or None))

    def read_table(self, run_id: str, artifact_file: str):
        """The run's Parquet artifact `artifact_file` as a pyarrow table, or None if it has none."""
        import tempfile

        import pyarrow.parquet as pq

        folder = artifact_file.rpartition("/")[0]
        listed = self._call(f"list artifacts of run {run_id}", lambda: self.client.list_artifacts(run_id, folder or None))
        if artifact_file not in {f.path for f in listed}:
            return None
        with tempfile.TemporaryDirectory(prefix="entityclip-table-") as d:
            local = self._call(f"download {artifact_file} of run {run_id}",
                               lambda: self.client.download_artifacts(run_id, artifact_file, d))
            return pq.read_table(local)

    def register_model(self, run_id: str, artifact_path: str, name: str) -> str:
        """A registered model version whose source is the run's checkpoint artifacts."""
        def _register():
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                    raise
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
            return self.client.create_model_version(name, source, run_id=run_id).version

        return str(self._call("register the model", _register))

    def set_alias(self, name: str, version: str, alias: str) -> None:
        """Point registered model `name`'s alias (e.g. champion) at `version`."""
        self._call(f"set alias {alias!r} on {name} version {version}",
                   lambda: self.client.set_registered_model_alias(name, alias, str(version)))

    def version_of_run(self, run_id: str) -> tuple[str, str] | None:
        """(registered model name, version) that training run `run_id` registered, or None."""
        versions = self._call("find the run's model version",
                              lambda: self.client.search_model_versions(f"run_id = '{run_id}'"))
        return (versions[0].name, str(versions[0].version)) if versions else None

    def model_version(self, name: str, version: str | None = None, alias: str | None = None) -> tuple[str, str]:
        """(version, run id) of registered model `name`'s `version`, or the one `alias` names."""
        what = f"find {name} {'version ' + version if version else '@' + str(alias)}"
        found = self._call(what, lambda: self.client.get_model_version(name, version) if version
                           else self.client.get_model_version_by_alias(name, alias))
        return str(found.version), found.run_id

    def alias_version(self, name: str, alias: str) -> tuple[str, str] | None:
        """(version, run id) that registered model `name`'s `alias` names, or None where it
        names none (or the model does not exist yet)."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise TrackingError(f"MLflow ({self.uri}) refused to read {name}@{alias}: {exc.message}") from None
        except requests.RequestException as exc:
            raise TrackingError(f"MLflow ({self.uri}) unreachable while reading {name}@{alias} ({exc})") from None
        return str(found.version), found.run_id

    def has_artifact(self, run_id: str, path: str) -> bool:
        """Whether run `run_id` logged anything at artifact `path` (a file or folder)."""
        return bool(self._call(f"list artifacts of run {run_id}", lambda: self.client.list_artifacts(run_id, path)))

    def download_version(self, name: str, version: str, dst: str) -> str:
        """The artifacts of registered model `name`'s `version` (its source) into local `dst`."""
        import mlflow.artifacts

        def _download():
            source = self.client.get_model_version(name, version).source
            return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=self.uri)

        return self._call(f"download {name} version {version}", _download)

    def reopen_run(self, run_id: str) -> None:
        """Mark an interrupted run as running again (it is being resumed)."""
        self._call("reopen the run", lambda: self.client.update_run(run_id, "RUNNING"))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("end the run", lambda: self.client.set_terminated(run_id, status))

    def run(self, run_id: str):
        return self._call(f"read run {run_id}", lambda: self.client.get_run(run_id))

    def runs(self, experiment: str) -> list:
        def _search():
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                return []
            return self.client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])

        return self._call("search runs", _search)


def tracker_for(cfg: PipelineConfig) -> Tracker:
    """The tracker of `cfg`: its tracking server, or the local default store of its run."""
    from entityclip.paths import RunPaths

    local = RunPaths.for_config(cfg).local
    return Tracker(resolve_uri(cfg.tracking, local), artifact_root(cfg.tracking, local))
