"""Ray Jobs: submit a command to a Ray cluster (local, a VM cluster or KubeRay) and follow it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from entityclip.errors import EntityClipError
from entityclip.runtime import TRAIN_ENV

# Never uploaded with the working directory: environments, run outputs, VCS data.
EXCLUDES = [".venv", "venv", "runs", "mlruns", ".git", "**/__pycache__", ".pytest_cache"]
# Passed through to the job so it reaches the same storage and tracking as the submitter. Never
# credentials: the Jobs API and the dashboard show a job's runtime env to anyone who can read
# them. The cluster's pods get theirs from a Kubernetes Secret or pod identity.
PASSTHROUGH = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def ray_token() -> str:
    """The token for a Ray cluster with token authentication, found where Ray itself looks:
    $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token; "" if none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if "RAY_AUTH_TOKEN_PATH" in os.environ:
            raise EntityClipError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist") from None
        return ""
    except OSError as exc:
        raise EntityClipError(f"cannot read the Ray token file {path} ({exc.strerror})") from None


def _connect(address: str):
    from ray.job_submission import JobSubmissionClient

    token = ray_token()
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
    except Exception as exc:  # ConnectionError, or a RuntimeError naming the address or the refusal
        text = str(exc)
        if "401" in text or "Authentication required" in text:
            raise EntityClipError(f"the Ray cluster at {address} requires a token: set RAY_AUTH_TOKEN or write it to "
                                  "~/.ray/auth_token (on KubeRay, from the cluster's auth Secret)") from None
        if "403" in text or "Authentication failed" in text:
            raise EntityClipError(f"the Ray cluster at {address} refused the token (RAY_AUTH_TOKEN, "
                                  "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): it is not this cluster's") from None
        raise EntityClipError(f"cannot reach the Ray Jobs API at {address} ({text.splitlines()[0] if text else exc!r})") from None


def submit_job(address: str, entrypoint: str, working_dir: str = ".", wait: bool = True,
               timeout_s: float = 3600, poll_s: float = 2.0) -> dict:
    client = _connect(address)
    env = {**TRAIN_ENV, **{k: os.environ[k] for k in PASSTHROUGH if k in os.environ}}
    job_id = client.submit_job(entrypoint=entrypoint,
                               runtime_env={"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env})
    out = {"job_id": job_id, "address": address, "status": "PENDING"}
    if not wait:
        return out
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            logs = client.get_job_logs(job_id)
            out.update(status=status, logs_tail=logs[-4000:])
            if status != "SUCCEEDED":
                raise EntityClipError(f"job {job_id} {status}; last log lines:\n{logs[-2000:]}")
            return out
        time.sleep(poll_s)
    raise EntityClipError(f"job {job_id} still running after {timeout_s:.0f}s (it keeps running on the cluster)")
