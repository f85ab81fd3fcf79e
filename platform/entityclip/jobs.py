"""Ray Jobs: submit a command to a Ray cluster (local, a VM cluster or KubeRay) and follow it."""

from __future__ import annotations

import os
import time

from entityclip.errors import EntityClipError
from entityclip.runtime import TRAIN_ENV

# Never uploaded with the working directory: environments, run outputs, VCS data.
EXCLUDES = [".venv", "venv", "runs", "mlruns", ".git", "**/__pycache__", ".pytest_cache"]
# Passed through to the job so it reaches the same storage and tracking as the submitter.
PASSTHROUGH = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
               "AWS_REGION", "MLFLOW_TRACKING_URI")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submit_job(address: str, entrypoint: str, working_dir: str = ".", wait: bool = True,
               timeout_s: float = 3600, poll_s: float = 2.0) -> dict:
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or a RuntimeError naming the address
        raise EntityClipError(f"cannot reach the Ray Jobs API at {address} ({exc})") from None
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
