import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from entityclip.config import PipelineConfig, choices, config_reference, dump_config, field_docs, flatten, load_config
from entityclip.errors import ConfigError

REPO = Path(__file__).parent.parent

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def fields(cls=PipelineConfig, prefix=""):
    """(dotted name, type, documentation) of every field, sections included."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, hints[f.name], docs.get(f.name, "")
        if dataclasses.is_dataclass(hints[f.name]):
            yield from fields(hints[f.name], f"{prefix}{f.name}.")


CHOICE_FIELDS = [(name, choices(typ)) for name, typ, _ in fields() if choices(typ)]


def test_defaults_describe_the_whole_pipeline():
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.model.variant == "entityclip"
    assert cfg.train.num_workers == 2
    assert (cfg.explain.engine, cfg.explain.model) == ("vllm", "world")  # a real LLM: the synthetic world's


def test_file_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.01\nmodel:\n  variant: clip_finetune\n")
    cfg = load_config(str(path), ["train.epochs=3", "storage.root=s3://bucket/run"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.variant) == (3, 0.01, "clip_finetune")
    assert cfg.storage.root == "s3://bucket/run"


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "evaluate.ks=[1, 2]"])
    path = tmp_path / "dump.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.epoch=3"], "unknown field"),
    (["train.epochs=three"], "expected int"),
    (["train"], "section.field=value"),
    (["nosuch.field=1"], "unknown field"),
    (["evaluate.ks=5"], "expected a list"),
    (["evaluate.ks=[1, x]"], r"ks\[1\]: expected int"),
])
def test_bad_overrides_are_rejected_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_or_malformed_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_flatten_gives_mlflow_style_params():
    params = flatten(load_config())
    assert params["train.lr"] == load_config().train.lr
    assert "model.variant" in params


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    load_config(str(path))


def test_configs_are_shipped():
    assert CONFIGS, "configs/*.yaml should hold the example configs"


def test_a_relative_local_root_is_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    from entityclip.pipeline import RunPaths

    monkeypatch.chdir(tmp_path)
    paths = RunPaths.for_config(load_config(None, ["storage.root=runs/x"]))
    assert paths.samples == f"{tmp_path}/runs/x/data/samples.parquet"
    assert RunPaths.for_config(load_config(None, ["storage.root=s3://b/p"])).root == "s3://b/p"


def test_every_field_and_section_is_documented_beside_it():
    undocumented = [name for name, _, doc in fields() if not doc.strip()]
    assert undocumented == []


@pytest.mark.parametrize("name, allowed", CHOICE_FIELDS, ids=[name for name, _ in CHOICE_FIELDS])
def test_a_choice_outside_its_values_is_refused_when_the_config_loads(name, allowed):
    assert load_config(None, [f"{name}={allowed[-1]}"])  # every allowed value loads
    with pytest.raises(ConfigError, match=f"{name}='bogus'; choose one of {list(allowed)}".replace("[", r"\[")):
        load_config(None, [f"{name}=bogus"])


def test_the_choice_fields_are_the_ones_with_fixed_values():
    assert {name for name, _ in CHOICE_FIELDS} >= {
        "data.source", "explain.engine", "model.variant", "train.placement_strategy", "train.precision",
        "train.cache", "train.positives", "evaluate.relevance", "index.kind", "serve.explainer", "serve.rerank"}


def test_the_documented_dump_loads_back_identically_and_shows_each_fields_docs(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "serve.rerank=none"])
    text = dump_config(cfg, docs=True)
    assert yaml.safe_load(text) == yaml.safe_load(dump_config(cfg))
    assert "# Ray Train checkpoints: resume point after a failure\n  checkpoint_every_epochs: 5" in text
    assert "rerank: none  # one of: auto, none, itm, late_interaction, xattn_fusion, mack, hosa" in text
    assert "rerankers: []  # any of: mack, hosa" in text  # a list of choices names them too


def test_the_shipped_default_config_is_the_defaults_with_their_docs():
    assert (REPO / "configs" / "default.yaml").read_text() == dump_config(load_config(), docs=True), \
        "regenerate it: .venv/bin/entityclip config > configs/default.yaml"


def test_the_configuration_reference_page_is_current():
    assert (REPO / "docs" / "configuration.md").read_text() == config_reference(), \
        "regenerate it: .venv/bin/entityclip config --reference > docs/configuration.md"
