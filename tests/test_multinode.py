"""A real two-node Ray cluster on this machine (`ray start --head` and a second `ray start
--address`): training submitted with `entityclip submit` places one DDP worker on each node,
and its checkpoints and MLflow artifacts land on the S3-compatible server."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from entityclip import publish, storage
from entityclip.runtime import free_port
from tests.conftest import BIN, MLFLOW_ARTIFACTS, TINY, tiny_config, wait_http

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def ray_start(*args: str, log: Path) -> subprocess.Popen:
    """One Ray node in its own process group (so that stopping it never touches the session's
    Ray), every port it opens chosen free."""
    ports = {"--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
             "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port"}
    cmd = [str(BIN / "ray"), "start", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           *(f"{p}={free_port()}" for p in sorted(ports)), *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_groups(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every node's process group at once; whatever still runs 5 s later is killed (the
    cluster is scratch)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        running = [p for p in procs if p.poll() is None]
        for proc in running:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass


def alive_nodes(gcs_address: str) -> int:
    """Asked from a separate process: this one is connected to the session's Ray."""
    code = f"import ray; ray.init(address={gcs_address!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


@pytest.fixture(scope="module")
def two_node_cluster(s3_endpoint):
    # Unix socket paths under the temp dir must stay short (108 bytes).
    temp = Path(tempfile.mkdtemp(prefix="r2-", dir="/tmp"))
    gcs, dashboard = free_port(), free_port()
    head = ray_start("--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}",
                     log=temp / "head.log")
    nodes = [head]
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_http(f"{address}/api/version", 120, head, temp / "head.log")
        # Its own temp dir: two nodes sharing one would share (and garbage-collect) each
        # other's copies of the job's working directory.
        (temp / "w").mkdir()
        nodes.append(ray_start(f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp / 'w'}", log=temp / "worker.log"))
        deadline = time.time() + 120
        while alive_nodes(f"127.0.0.1:{gcs}") < 2:
            if time.time() > deadline:
                raise RuntimeError(f"the second node never joined:\n{(temp / 'worker.log').read_text()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        stop_groups(nodes)


def test_training_submitted_to_two_nodes_spreads_workers_and_stores_on_s3(
        two_node_cluster, mlflow_server, s3_bucket, ray_session):
    from mlflow.tracking import MlflowClient

    from entityclip.pipeline import stage_data, stage_explain

    root = f"s3://{s3_bucket}/multinode"
    stage_data(tiny_config(root), progress=False)  # on the session's Ray; the cluster reads it from S3
    stage_explain(tiny_config(root), progress=False)
    overrides = [*TINY, f"storage.root={root}", f"tracking.uri={mlflow_server}", "tracking.experiment=multinode",
                 "train.placement_strategy=STRICT_SPREAD"]
    entrypoint = f"{sys.executable} jobs/train.py --no-progress " + " ".join(f"--set {o}" for o in overrides)
    result = subprocess.run([str(BIN / "entityclip"), "submit", "--address", two_node_cluster,
                             "--working-dir", str(REPO), entrypoint],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"status": "SUCCEEDED"' in result.stdout

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert len(run.data.tags["worker_nodes"].split(",")) == 2  # one worker on each node
    assert storage.exists(storage.join(publish.current(f"{root}/checkpoints/entityclip"), "model.safetensors"))
    ray_checkpoints = [u for u in storage.list_uris(f"{root}/ray_results") if u.endswith("train_state.pt")]
    assert ray_checkpoints, "Ray Train wrote no checkpoint to S3"
    artifacts = storage.list_uris(f"s3://{s3_bucket}/{MLFLOW_ARTIFACTS}")
    assert any(u.endswith(f"{run.info.run_id}/artifacts/checkpoint/model.safetensors") for u in artifacts)
    assert any(u.endswith(f"{run.info.run_id}/artifacts/model/MLmodel") for u in artifacts)  # the registered model
