"""Serve's lifecycle: deploy the retrieval app (or update the one running), block while it
serves, and roll it when the registry alias it serves moves. Used by `entityclip serve`, the
pipeline, the benchmarks and the tests."""

from __future__ import annotations

import time

from entityclip.config import PipelineConfig
from entityclip.errors import ConfigError, EntityClipError
from entityclip.runtime import init_ray, quiet_logs
from entityclip.tracking import tracker_for


def start_serving(cfg: PipelineConfig, blocking: bool = False) -> str:
    """Deploy the Serve app for `cfg.serve.model` (a registry version) or else the run root's
    `cfg.model.variant`; returns its base URL. An app already running in the Ray cluster is
    updated in place: Serve starts the new replicas before it retires the old ones. `blocking`
    keeps serving until Ctrl-C, following `serve.model`'s alias (see `follow_alias`), unless
    this call only updated a cluster's running app."""
    init_ray()  # first: Serve reads its settings from the environment on import
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.context import _get_global_client

    from entityclip.serving.app import APP_NAME, LOOPBACK, api_key, build_app

    quiet_logs()  # again: importing Serve configures its loggers
    if cfg.serve.host not in LOOPBACK and not api_key(cfg.serve):
        raise ConfigError(f"serve.host={cfg.serve.host} opens the API to the network: set an API key in "
                          f"${cfg.serve.api_key_env} (clients send Authorization: Bearer <key>), or keep "
                          "serve.host=127.0.0.1 behind an authenticating proxy")
    app, ref = build_app(cfg)  # checks what it serves before Serve starts
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    except RayError as exc:  # e.g. the port is taken, or HAProxy did not come up in time
        raise EntityClipError(f"Ray Serve did not start on port {cfg.serve.port}: {str(exc).splitlines()[0]}") from None
    # A Serve instance already running in this Ray keeps its own host and port.
    http = _get_global_client().http_config
    url = f"http://{http.host}:{http.port}"
    updating = APP_NAME in serve.status().applications
    serve.run(app, name=APP_NAME, route_prefix="/")
    what = f"{ref.uri} ({cfg.serve.model})" if ref else cfg.model.variant
    if blocking and updating:
        print(f"updated the running app at {url} to {what}; it keeps serving after this command", flush=True)
    elif blocking:
        print(f"serving {what} at {url} (Ctrl-C stops)", flush=True)
        following = ref is not None and "@" in cfg.serve.model and cfg.serve.follow_alias_s > 0
        deployed = ref.version if ref else None
        while True:
            time.sleep(cfg.serve.follow_alias_s if following else 3600)
            if following:
                deployed = follow_alias(cfg, deployed)
    return url


def follow_alias(cfg: PipelineConfig, deployed: str) -> str:
    """If `serve.model`'s alias now names another version than `deployed`, roll the running app
    to it (new replicas first, then the old ones retire); returns the version now deployed. A
    registry that cannot be read, or a version that cannot be served, leaves the app as it is."""
    from ray import serve

    from entityclip.registry import resolve
    from entityclip.serving.app import APP_NAME, build_app

    try:
        if resolve(tracker_for(cfg), cfg.serve.model).version == deployed:
            return deployed
        app, ref = build_app(cfg)
        serve.run(app, name=APP_NAME, route_prefix="/")
    except (EntityClipError, RuntimeError) as exc:  # RuntimeError: Serve could not start the new replicas
        print(f"still serving version {deployed}: cannot roll to {cfg.serve.model} ({str(exc).splitlines()[0]})",
              flush=True)
        return deployed
    print(f"rolled {cfg.serve.model} from version {deployed} to {ref.version}", flush=True)
    return ref.version
