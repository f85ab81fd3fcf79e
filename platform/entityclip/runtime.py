"""The Ray runtime every stage runs on: an embedded local Ray or the cluster in RAY_ADDRESS,
quiet by default, with Serve's throughput-optimized data plane.

Serve and Train settings are environment variables read when Ray's processes start, so they are set
here, before `ray.init`; on a cluster they belong in the head and worker pods' environment
(infra/kuberay/rayservice.yaml sets the same values). A variable already set wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

SERVE_ENV = {
    # HTTP goes client -> HAProxy -> the replica's own HTTP server (direct ingress): no Python
    # proxy hop, and HAProxy balances on least connections across replicas.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Every endpoint is read-only, so a request whose replica died before answering (empty
    # response) is safe to replay on another replica. (HAProxy never replays a connection reset.)
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response response-timeout",
    "RAY_SERVE_HAPROXY_RETRIES": "3",
    # HAProxy runs on the same node as its replicas here and learns of a stopping replica
    # within a second; Serve's default 30 s drain suits cloud load balancers, not this.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Replicas report their ongoing requests every second (default 10 s), so the autoscaler
    # sees a burst while it is still happening.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}

TRAIN_ENV = {
    # Ray Train's controller polls its workers this often (default 2 s): a finished run was
    # noticed up to 2 s late, a noticeable share of a short job.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

DASHBOARD_ENV = "ENTITYCLIP_RAY_DASHBOARD"

QUIET_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune", "mlflow")

# Set once by the CLI's --verbose; every stage's init_ray and quiet_logs follow it.
_verbose = False


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose
    # MLflow sets its own log level from this variable when it is first imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if verbose else "false")


# HAProxy's stats and Prometheus ports are fixed by default (8404, 9101); a local Ray takes
# free ones so that it never collides with another service on the machine.
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# LLMs and tokenizers load from local folders only: Hugging Face libraries never reach for a hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def set_ray_env() -> None:
    for key, value in {**SERVE_ENV, **TRAIN_ENV, **OFFLINE_ENV}.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("RAY_ADDRESS"):
        for key in HAPROXY_PORTS:
            os.environ.setdefault(key, str(free_port()))


def quiet_logs() -> None:
    """Ray, Serve and MLflow print INFO lines by default; keep warnings and errors only."""
    level = logging.INFO if _verbose else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # Ray's LLM loggers each get their own INFO handler unless their parent has one: give the
    # parent one (new loggers then follow its level) and set the level of those that exist.
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.StreamHandler())
        llm.propagate = False
    for name, logger in [("ray.llm", llm), *logging.root.manager.loggerDict.items()]:
        if name.startswith("ray.llm") and isinstance(logger, logging.Logger):
            logger.setLevel(level)


@contextlib.contextmanager
def quiet(logger: str):
    """Only errors from `logger` inside the block (unless --verbose): for library calls that
    log warnings about our own, deliberate setup."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(logging.INFO if _verbose else logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def init_ray() -> None:
    """Join RAY_ADDRESS's cluster if set (Ray Jobs set it), else start an embedded local Ray."""
    set_ray_env()
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A local Ray started for one run leaves out the dashboard: its head and nine module
        # processes held 1.1 GB and took CPU from training on 2 cores (docs/scale.md), and a
        # run needs none of it. DASHBOARD_ENV=1 keeps it (to watch a run, or for Ray's state API).
        dashboard = None if address else os.environ.get(DASHBOARD_ENV) == "1"
        # A new local Ray enables token authentication and warns that it did: our choice too.
        with quiet("ray._private.authentication.authentication_token_setup"):
            ray.init(address=address, include_dashboard=dashboard,
                     logging_level=logging.INFO if _verbose else logging.WARNING,
                     configure_logging=True, log_to_driver=_verbose)
    quiet_logs()
    # Ray Data logs each failure, traceback included, and then raises it; the raised error is
    # what we report (one line for bad input, the full traceback for anything else).
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own tqdm bars report progress per stage
    ctx.print_on_execution_start = False
    # Our actors raise EntityClipErrors for bad input; keep their type instead of a bare
    # UserCodeException so the CLI can show them as one clear line.
    ctx.raise_original_map_exception = True
