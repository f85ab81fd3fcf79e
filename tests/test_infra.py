"""Shipped deployment files are what a cluster would accept (validated against KubeRay's CRDs
and Kubernetes' schemas, vendored under tests/schemas), lock the cluster down, and point at
code and files that exist."""

import copy
import gzip
import importlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "tests" / "schemas"
MANIFESTS = sorted((REPO / "infra").rglob("*.yaml"))
KUBERAY = sorted((REPO / "infra" / "kuberay").glob("*.yaml"))


def strict(schema):
    """A structural schema as the API server applies it with strict field validation: an object
    that lists its properties refuses any other (unless it preserves unknown fields), and a
    required field with a default is not missing (the server fills it in before validating)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        if "required" in schema and isinstance(schema.get("properties"), dict):
            schema["required"] = [r for r in schema["required"] if "default" not in schema["properties"].get(r, {})]
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def kuberay_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted((SCHEMAS / "kuberay-v1.5.1").glob("*.yaml.gz")):
        crd = yaml.safe_load(gzip.decompress(path.read_bytes()))
        for version in crd["spec"]["versions"]:
            schemas[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = \
                strict(version["schema"]["openAPIV3Schema"])
    network_policy = json.loads((SCHEMAS / "kubernetes" / "networkpolicy-networking-v1.json").read_text())
    schemas[("networking.k8s.io/v1", "NetworkPolicy")] = strict(network_policy)
    return schemas


SCHEMA_OF = kuberay_schemas()


def problems(doc: dict) -> list[str]:
    schema = SCHEMA_OF.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return [f"no vendored schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    errors = jsonschema.Draft7Validator(schema).iter_errors(doc)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message[:200]}" for e in errors]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pods(doc: dict) -> list[dict]:
    """Every pod template of a RayCluster, RayJob or RayService."""
    spec = {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


@pytest.mark.parametrize("path", KUBERAY, ids=[p.name for p in KUBERAY])
def test_manifests_validate_against_kuberay_and_kubernetes_schemas(path):
    docs = documents(path)
    assert docs
    for doc in docs:
        assert problems(doc) == [], (path.name, doc["kind"])


def test_the_validation_refuses_a_misspelt_or_mistyped_field():
    cluster = documents(REPO / "infra/kuberay/raycluster.yaml")[0]
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["rayStartParms"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    assert any("rayStartParms" in p for p in problems(typo))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["authOptions"]["mode"] = "password"
    assert any("authOptions.mode" in p for p in problems(wrong))
    container = copy.deepcopy(cluster)
    pods(container)[0]["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] = "yes"
    assert any("runAsNonRoot" in p for p in problems(container))


@pytest.mark.parametrize("path", [p for p in KUBERAY if p.name != "networkpolicy.yaml"], ids=lambda p: p.name)
def test_every_ray_cluster_wants_a_token_and_runs_locked_down_pods(path):
    for doc in documents(path):
        spec = {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
                "RayService": doc["spec"].get("rayClusterConfig")}[doc["kind"]]
        assert spec["authOptions"] == {"mode": "token"}
        for pod in pods(doc):
            assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "entityclip"  # the NetworkPolicy's selector
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
            assert pod["spec"]["automountServiceAccountToken"] is False
            for container in pod["spec"]["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert sc["readOnlyRootFilesystem"] is True
                assert {"cpu", "memory", "ephemeral-storage"} <= set(container["resources"]["limits"])
                # Credentials come from Secrets by reference, never as literal values.
                for env in container.get("env", []):
                    assert not re.search("SECRET|KEY|TOKEN|PASSWORD", env["name"]) or "valueFrom" in env, env


def test_serve_pods_hold_read_only_storage_credentials_and_an_api_key():
    service = documents(REPO / "infra/kuberay/rayservice.yaml")[0]
    for pod in pods(service):
        container = pod["spec"]["containers"][0]
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["entityclip-s3-readonly"]
        key = next(e for e in container["env"] if e["name"] == "ENTITYCLIP_API_KEY")
        assert key["valueFrom"]["secretKeyRef"]["name"] == "entityclip-serve-api-key"


def test_the_network_policy_admits_only_the_platform_submitters_and_the_ingress():
    policies = documents(REPO / "infra/kuberay/networkpolicy.yaml")
    assert all(p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "entityclip"} for p in policies)
    rules = [rule for p in policies for rule in p["spec"]["ingress"]]
    assert all(rule.get("from") for rule in rules)  # every rule names who may connect
    outside = [rule for rule in rules if rule["from"] != [{"podSelector": policies[0]["spec"]["podSelector"]}]]
    # From outside the platform's own pods: the Jobs API and Serve, each on its port alone.
    assert sorted(port["port"] for rule in outside for port in rule["ports"]) == [8000, 8265]


def test_the_image_is_multi_stage_pinned_by_digest_and_runs_as_a_non_root_user():
    dockerfile = (REPO / "infra/Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", dockerfile, flags=re.M).group(1)
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base)
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", dockerfile, flags=re.M)
    assert len(stages) >= 2 and {image for image, _ in stages} == {"${BASE}"}
    final = dockerfile[dockerfile.rindex("\nFROM "):]
    assert "build-essential" not in final and "apt-get install" not in final
    user = re.findall(r"^USER (\S+)$", final, flags=re.M)
    assert user and user[-1] not in {"root", "0", "0:0"}


def import_object(import_path: str):
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
        assert callable(import_object(app["import_path"]))
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
        env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}
        assert env == SERVE_ENV


def test_rayjob_runs_a_shipped_entry_point():
    job = yaml.safe_load((REPO / "infra/kuberay/rayjob.yaml").read_text())
    script = job["spec"]["entrypoint"].split()[1]
    assert (REPO / script).is_file()
    for name in ("data", "explain", "train", "index", "evaluate", "pipeline"):
        assert (REPO / "jobs" / f"{name}.py").is_file()
