"""Evidence: training is reproducible, seeds are an axis of runs, comparisons are paired tests
on the same test queries, and promotion moves the champion only on a significant gain."""

import json
import shutil
import subprocess

import pytest

from entityclip import publish, storage
from entityclip.compare import collect, compare_pair, compare_runs, group_id, promote_best, seed_groups
from entityclip.paths import RunPaths
from entityclip.pipeline import explanations_fingerprint
from entityclip.tracking import EXPLANATIONS_TAG, QUERY_RESULTS_ARTIFACT, tracker_for
from tests.conftest import TINY, tiny_config
from tests.test_cli import ENTITYCLIP

METRIC = "test_unseen/rsum"


@pytest.fixture(scope="module")
def evidence(trained_run, mlflow_server, cluster_env, tmp_path_factory):
    """The session run's data and explanations in a root of their own, its own experiment and
    registered model; `entityclip pipeline --seeds 0,1` trains there through the CLI."""
    root = tmp_path_factory.mktemp("evidence")
    shutil.copytree(trained_run["root"] / "data", root / "data")
    shutil.copy(trained_run["root"] / "explanations.parquet", root / "explanations.parquet")
    cfg = tiny_config(root, f"tracking.uri={mlflow_server}", "tracking.experiment=evidence",
                      "tracking.registered_model=evidence")
    args = ["--root", str(root), "--no-progress", "--set", f"tracking.uri={mlflow_server}",
            "--set", "tracking.experiment=evidence", "--set", "tracking.registered_model=evidence",
            *[arg for item in TINY for arg in ("--set", item)]]
    done = subprocess.run([ENTITYCLIP, "pipeline", "--seeds", "0,1", "--no-serve", *args], capture_output=True,
                          text=True, env=cluster_env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Over seeds" in done.stdout and "±" in done.stdout  # the printed table
    results = json.loads((root / "summary.json").read_text())["results"]
    return {"cfg": cfg, "root": root, "args": args, "env": cluster_env,
            "by_seed": {str(r["seed"]): r for r in results.values()}}


def test_the_same_config_and_seed_train_to_the_same_metrics(trained_run, evidence):
    # The session's run and this one share data, explanations, config and seed 0; only the
    # storage root and the experiment differ. Every figure and every query's rank agree.
    again = evidence["by_seed"]["0"]["metrics"]
    assert again == trained_run["metrics"]
    tracker = tracker_for(evidence["cfg"])
    first = tracker.read_table(trained_run["train"].run_id, QUERY_RESULTS_ARTIFACT)
    second = tracker.read_table(evidence["by_seed"]["0"]["run_id"], QUERY_RESULTS_ARTIFACT)
    assert first.equals(second)


def test_seeds_train_side_by_side_and_compare_groups_them(evidence):
    paths = RunPaths.for_config(evidence["cfg"])
    assert storage.exists(storage.join(publish.current(paths.checkpoint("entityclip")), "model.json"))  # seed 0: the default key
    assert storage.exists(storage.join(publish.current(paths.checkpoint("entityclip-seed1")), "model.json"))
    assert storage.exists(paths.query_results("entityclip-seed1"))
    rows = [r for r in collect(evidence["cfg"]) if not r["reranker"]]
    assert sorted(r["seed"] for r in rows) == ["0", "1"]
    (group,) = [g for g in seed_groups(rows)]
    assert sorted(group.seeds) == ["0", "1"] and set(group.run_ids) == {r["run_id"] for r in rows}
    values = [r[METRIC] for r in rows]
    assert group.rsum["test_unseen"].mean == pytest.approx(sum(values) / 2)
    assert group.rsum["test_unseen"].low == min(values) and group.rsum["test_unseen"].high == max(values)
    text, _ = compare_runs(evidence["cfg"])
    assert "Over seeds" in text and group.id in text and "±" in text
    # The index-only group and its GI-ITM re-ranked twin: each group is tested against the best.
    assert "Paired against the best group by test_unseen/rsum" in text and "significant at 95%" in text
    fingerprint = explanations_fingerprint(paths.explanations)
    assert all(tracker_for(evidence["cfg"]).tags(r["run_id"])[EXPLANATIONS_TAG] == fingerprint for r in rows)


def test_a_configuration_is_its_params_but_the_seed_and_the_explanations_it_read():
    params = {"train.seed": "0", "train.lr": "0.001"}
    assert group_id(params, "") == group_id({**params, "train.seed": "3"}, "")
    assert group_id(params, "") != group_id({**params, "train.lr": "0.003"}, "")
    assert group_id(params, "", "e44edeb98fb78b2f") != group_id(params, "", "8b8945c4630ae6a4")
    assert group_id(params, "") != group_id(params, "itm")  # a re-ranked evaluation is another configuration


def test_every_evaluation_logs_intervals_that_bracket_its_figures(evidence):
    metrics = evidence["by_seed"]["1"]["metrics"]["test_unseen"]
    for name in ("rsum", "t2i_r1", "i2t_map10"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    row = next(r for r in collect(evidence["cfg"]) if r["seed"] == "1" and not r["reranker"])
    assert row[f"{METRIC}_ci_low"] == pytest.approx(metrics["rsum_ci_low"])


def test_promotion_needs_a_significant_paired_gain_or_force(evidence):
    cfg = evidence["cfg"]
    first = promote_best(cfg, METRIC)
    assert first["promoted"] and "had no 'champion'" in first["reason"]
    assert promote_best(cfg, METRIC)["promoted"] is False  # already the champion: nothing moves

    # The champion's seed trained again (`train --seeds`): the same model, a new version, the same score.
    champion_seed = next(r["seed"] for r in collect(cfg) if r["run"] == first["run"])
    cli = subprocess.run([ENTITYCLIP, "train", "--seeds", champion_seed, *evidence["args"]],
                         capture_output=True, text=True, env=evidence["env"], timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    twin = json.loads(cli.stdout)[champion_seed]
    tracker = tracker_for(cfg)
    refused = promote_best(cfg, METRIC)
    twin_version = twin["model"].rsplit("/", 1)[1]
    assert refused["promoted"] is False and refused["version"] == twin_version
    assert "difference +0.0" in refused["reason"] and "not significant" in refused["reason"]
    assert "--force" in refused["reason"]
    assert tracker.alias_version("evidence-entityclip", "champion")[0] == first["version"]

    result = compare_pair(cfg, twin["train"]["run_id"], first["run"], METRIC)
    assert result.difference == 0 and not result.significant

    cli = subprocess.run([ENTITYCLIP, "compare", "--promote", METRIC, "--force", *evidence["args"]],
                         capture_output=True, text=True, env=evidence["env"], timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    forced = json.loads(cli.stdout[cli.stdout.index("\n{") + 1:])  # the JSON after the table
    assert forced["promoted"] and "promoted by --force" in forced["reason"]
    assert tracker.alias_version("evidence-entityclip", "champion")[0] == twin_version


def test_compare_paired_names_runs_or_seed_groups(evidence):
    rows = [r for r in collect(evidence["cfg"]) if not r["reranker"]]
    group = seed_groups(rows)[0].id
    cli = subprocess.run([ENTITYCLIP, "compare", "--paired", group, rows[-1]["run_id"], *evidence["args"]],
                         capture_output=True, text=True, env=evidence["env"], timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"paired, {group} minus {rows[-1]['run_id']}: {METRIC}" in cli.stdout
    assert "significant at 95%" in cli.stdout
    unknown = subprocess.run([ENTITYCLIP, "compare", "--paired", "nope", group, *evidence["args"]],
                             capture_output=True, text=True, env=evidence["env"], timeout=300)
    assert unknown.returncode == 2 and "no evaluated run or seed group 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


@pytest.mark.parametrize("seeds, message", [("0,0", "repeats a seed"), ("one,two", "comma-separated integers")])
def test_bad_seed_lists_are_one_line_errors(seeds, message):
    from tests.test_cli import run_cli

    result = run_cli("train", "--seeds", seeds, "--root", "/nonexistent/run")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_seed_groups_are_named_by_what_sets_them_apart():
    def row(group, lr, seed, unseen):
        return {"group": group, "config": {"model.variant": "entityclip", "train.lr": lr, "train.epochs": "60"},
                "variant": "entityclip", "reranker": "", "seed": seed, "run_id": f"{group}{seed}",
                "test_seen/rsum": 500.0, "test_unseen/rsum": unseen}

    rows = [row("a", "0.001", "0", 300.0), row("a", "0.001", "1", 320.0), row("b", "0.003", "0", 280.0),
            row("b", "0.003", "1", 290.0), row("c", "0.01", "0", 100.0)]  # one run: not a seed group
    groups = seed_groups(rows)
    assert [(g.id, g.label, g.seeds) for g in groups] == [("a", "entityclip train.lr=0.001", ["0", "1"]),
                                                           ("b", "entityclip train.lr=0.003", ["0", "1"])]
    assert groups[0].rsum["test_unseen"].mean == 310.0
