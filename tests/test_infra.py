"""Shipped deployment files parse and point at code and files that exist."""

import importlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((REPO / "infra").rglob("*.yaml"))


def resolve(import_path: str):
    module, attr = import_path.split(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifests_parse(path):
    assert all(doc for doc in yaml.safe_load_all(path.read_text()))


def test_serve_configs_name_an_importable_builder_and_a_shipped_config(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    service = yaml.safe_load((REPO / "infra/kuberay/rayservice.yaml").read_text())
    configs = [yaml.safe_load((REPO / "serve/config.yaml").read_text()), yaml.safe_load(service["spec"]["serveConfigV2"])]
    for config in configs:
        app = config["applications"][0]
        assert callable(resolve(app["import_path"]))
        assert (REPO / app["args"]["config"]).is_file()


def test_serve_configs_overrides_are_valid_config_fields():
    from entityclip.config import load_config

    service = yaml.safe_load((REPO / "infra/kuberay/rayservice.yaml").read_text())
    for config in [yaml.safe_load((REPO / "serve/config.yaml").read_text()), yaml.safe_load(service["spec"]["serveConfigV2"])]:
        args = config["applications"][0]["args"]
        load_config(str(REPO / args["config"]), args["overrides"])  # raises on an unknown field


def test_rayservice_sets_the_serve_environment_the_embedded_runtime_sets():
    from entityclip.runtime import SERVE_ENV

    service = yaml.safe_load((REPO / "infra/kuberay/rayservice.yaml").read_text())
    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
        assert env == SERVE_ENV


def test_rayjob_runs_a_shipped_entry_point():
    job = yaml.safe_load((REPO / "infra/kuberay/rayjob.yaml").read_text())
    script = job["spec"]["entrypoint"].split()[1]
    assert (REPO / script).is_file()
    for name in ("data", "explain", "train", "index", "evaluate", "pipeline"):
        assert (REPO / "jobs" / f"{name}.py").is_file()
