"""Compare tracked runs: one row per run of the experiment with 95% intervals, the runs that
differ only by training seed summarized over their seeds, paired tests on the same test
queries (stats.py), a bar chart with error bars, all of it as one HTML report, and promotion
that moves the champion only on a significant gain."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from entityclip.config import PipelineConfig
from entityclip.data.samples import COMPOSED_SPLIT, COMPOSITIONAL_SPLIT
from entityclip.errors import ConfigError
from entityclip.evaluate import QueryResults, sample_scores
from entityclip.rerank import DEFINING
from entityclip.stats import PairedResult, SeedSummary, over_seeds, paired_bootstrap
from entityclip.tracking import EXPLANATIONS_TAG, QUERY_RESULTS_ARTIFACT, Tracker, tracker_for

COLUMNS = ["t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "rsum"]
# The compositional split by its rsum and its minimal-pair accuracies (50: a bag of words); the
# composed queries by their recall of the target image.
SPLIT_COLUMNS = {"test_seen": COLUMNS, "test_unseen": COLUMNS, COMPOSITIONAL_SPLIT: ["rsum", "t2i_pair", "i2t_pair"],
                 COMPOSED_SPLIT: ["t2i_r1", "t2i_r10", "rsum"]}
SPLITS = list(SPLIT_COLUMNS)
METRICS = [f"{s}/{c}" for s, columns in SPLIT_COLUMNS.items() for c in columns]
SEED_PARAM = "train.seed"


def group_id(params: dict[str, str], reranker: str, explanations: str = "") -> str:
    """Runs with this id differ at most by their training seed: the same configuration, trained
    on the same explanations (their fingerprint, pipeline.EXPLANATIONS_TAG)."""
    same = {k: v for k, v in params.items() if k != SEED_PARAM} | {"reranker": reranker, "explanations": explanations}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:8]


def collect(cfg: PipelineConfig, sweep: str | None = None) -> list[dict]:
    """One row per evaluated run of the experiment (only sweep `sweep`'s trials, if given), and
    one more per re-ranked evaluation of it; each metric with its interval where it was logged."""
    rows = []
    for run in tracker_for(cfg).runs(cfg.tracking.experiment):
        if sweep is None or run.data.tags.get("sweep") == sweep:
            rows += rows_of(run)
    return rows


def rows_of(run) -> list[dict]:
    """An MLflow run's rows: none before it is evaluated (unfinished or failed runs), one for
    its index alone and one per re-ranked evaluation."""
    m, tags = run.data.metrics, run.data.tags
    if not any(k.startswith("test_") for k in m):
        return []
    params = " ".join(f"{k[len('param.'):]}={v}" for k, v in sorted(tags.items()) if k.startswith("param."))
    # A re-ranked evaluation logs "<reranker>/<split>/<metric>" (pipeline.stage_evaluate);
    # `served` marks the row that serve.rerank's default (auto) serves.
    rerankers = sorted({k.split("/")[0] for k in m if k.count("/") == 2 and k.split("/")[1] in SPLITS})
    served = next((r for r in rerankers if r in DEFINING), "")
    rows = []
    for reranker in ["", *rerankers]:
        prefix = f"{reranker}/" if reranker else ""
        rows.append({"run": run.info.run_name + (f" +{reranker}" if reranker else ""),
                     "run_id": run.info.run_id, "variant": tags.get("variant", "?"),
                     "sweep": tags.get("sweep", ""), "params": params, "reranker": reranker,
                     "served": reranker == served, "seed": run.data.params.get(SEED_PARAM, "?"),
                     "group": group_id(run.data.params, reranker, tags.get(EXPLANATIONS_TAG, "")),
                     "config": {k: v for k, v in run.data.params.items() if k != SEED_PARAM},
                     **{f"{key}{end}": m.get(f"{prefix}{key}{end}")
                        for key in METRICS for end in ("", "_ci_low", "_ci_high")}})
    return rows


def with_interval(value: float | None, low: float | None = None, high: float | None = None) -> str:
    """`76.4±6.2`: the value and half its 95% interval's width (where it was logged)."""
    if value is None:
        return "-"
    return f"{value:.1f}" if low is None or high is None else f"{value:.1f}±{(high - low) / 2:.1f}"


def table(rows: list[dict]) -> str:
    """The recall table (± half the 95% bootstrap interval over test queries); sweep trials also
    show the values they were run with."""
    width = max([34, *(len(r["run"]) for r in rows)])
    head = f"{'run':<{width}} " + " ".join(f"{split.removeprefix('test_')[:6]}/{name:<7}"
                                            for split, name in (m.split("/") for m in METRICS))
    with_params = any(r["params"] for r in rows)
    lines = [head + ("  params" if with_params else "")]
    for r in rows:
        cells = [with_interval(r[m], r[f"{m}_ci_low"], r[f"{m}_ci_high"]) for m in METRICS]
        line = f"{r['run']:<{width}} " + " ".join(f"{c:>14}" for c in cells)
        lines.append(line + (f"  {r['params']}" if with_params else ""))
    lines.append("± is half the width of the 95% bootstrap interval over test queries")
    return "\n".join(lines)


@dataclass(frozen=True)
class SeedGroup:
    """The runs of one configuration (one `group_id`) and each split's rsum over their seeds."""
    id: str
    label: str
    seeds: list[str]
    run_ids: list[str]
    rsum: dict[str, SeedSummary]


def seed_groups(rows: list[dict], min_runs: int = 2) -> list[SeedGroup]:
    """Configurations evaluated with at least `min_runs` runs, in the order first seen; each
    labelled by its variant, re-ranker and the params in which the groups differ."""
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["group"], []).append(r)
    chosen = {gid: members for gid, members in by_id.items() if len(members) >= min_runs}
    configs = [members[0]["config"] for members in chosen.values()]
    differing = sorted({k for c in configs for k in c if len({d.get(k) for d in configs}) > 1} - {"model.variant"})
    groups = []
    for gid, members in chosen.items():
        first = members[0]
        label = " ".join([first["variant"] + (f" +{first['reranker']}" if first["reranker"] else ""),
                          *(f"{k}={first['config'].get(k, '-')}" for k in differing)])
        rsum = {s: over_seeds([m[f"{s}/rsum"] for m in members]) for s in SPLITS
                if all(m.get(f"{s}/rsum") is not None for m in members)}  # runs before a split have none
        groups.append(SeedGroup(gid, label, [m["seed"] for m in members], [m["run_id"] for m in members], rsum))
    return groups


def seed_table(groups: list[SeedGroup]) -> str:
    width = max([26, *(len(g.label) for g in groups)])
    lines = [f"{'group':<9} {'configuration':<{width}} {'seeds':<12} "
             + " ".join(f"{s.split('_')[1] + ' rsum: mean [95% CI] sd (min-max)':<46}" for s in SPLITS)]
    for g in groups:
        cells = [f"{v.mean:.1f} [{v.ci_low:.1f}, {v.ci_high:.1f}] sd {v.std:.1f} ({v.low:.1f}-{v.high:.1f})"
                 if (v := g.rsum.get(s)) else "-" for s in SPLITS]
        lines.append(f"{g.id:<9} {g.label:<{width}} {','.join(sorted(g.seeds, key=str)):<12} "
                     + " ".join(f"{c:<46}" for c in cells))
    return "\n".join(lines)


def _split_metric(metric: str) -> tuple[str, str]:
    split, _, name = metric.rpartition("/")
    if split not in SPLITS or not name:
        raise ConfigError(f"cannot compare by {metric!r}; name a split and a metric, e.g. test_unseen/rsum "
                          f"(splits {SPLITS})")
    return split, name


def query_scores(tracker: Tracker, row: dict, metric: str, ks: list[int]) -> tuple[list[str], np.ndarray]:
    """(sample ids, per-sample scores) of `metric` in the evaluation that `row` shows."""
    split, name = _split_metric(metric)
    table = tracker.read_table(row["run_id"], QUERY_RESULTS_ARTIFACT)
    if table is None:
        raise ConfigError(f"run {row['run']} has no per-query results to compare (evaluated before they were "
                          f"kept): `entityclip evaluate --run-id {row['run_id']}` with its config adds them")
    evaluation = f"{row['reranker']}/{split}" if row["reranker"] else split
    mask = np.array([e == evaluation for e in table["evaluation"].to_pylist()])
    results = QueryResults.from_table(table.filter(mask))
    scores = sample_scores(results, ks)
    if name not in scores:
        raise ConfigError(f"cannot compare by {name!r}; choose one of {sorted(scores)}")
    order = np.argsort(results.sample_ids)
    return [results.sample_ids[i] for i in order], scores[name][order]


def select(rows: list[dict], name: str) -> list[dict]:
    """The rows `name` picks: a seed group's id (all its runs), or a run id or a run's name as
    the table shows it (a run's id picks the row its model serves)."""
    group = [r for r in rows if r["group"] == name]
    if group:
        return group
    run = [r for r in rows if name in (r["run_id"], r["run"])]
    if not run:
        raise ConfigError(f"no evaluated run or seed group {name!r} in the experiment; "
                          "give a run name or id, or a group id from `entityclip compare`")
    return [r for r in run if r["served"]][:1] or run


def paired(cfg: PipelineConfig, a: list[dict], b: list[dict], metric: str) -> PairedResult:
    """Group `a` against group `b` (one run or several seeds each) on the same test queries;
    groups trained with the same seeds are also paired seed by seed."""
    tracker = tracker_for(cfg)
    same_seeds = len(a) > 1 and sorted(r["seed"] for r in a) == sorted(r["seed"] for r in b)
    if same_seeds:
        a, b = sorted(a, key=lambda r: r["seed"]), sorted(b, key=lambda r: r["seed"])
    sides = []
    for rows in (a, b):
        scored = [query_scores(tracker, r, metric, cfg.evaluate.ks) for r in rows]
        sides.append(scored)
    ids = sides[0][0][0]
    for ids_other, _ in sides[0] + sides[1]:
        if ids_other != ids:
            raise ConfigError("the runs were evaluated on different test queries (other data or split); "
                              "a paired comparison needs the same ones")
    return paired_bootstrap(metric, np.stack([s for _, s in sides[0]]), np.stack([s for _, s in sides[1]]),
                            same_seeds=same_seeds)


def compare_pair(cfg: PipelineConfig, a: str, b: str, metric: str = "test_unseen/rsum",
                 sweep: str | None = None) -> PairedResult:
    rows = collect(cfg, sweep)
    return paired(cfg, select(rows, a), select(rows, b), metric)


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    x = np.arange(len(rows))
    for i, split in enumerate(SPLITS):
        key = f"{split}/rsum"
        values = np.array([r[key] or 0.0 for r in rows])
        # Error bars only where the interval was logged (runs evaluated before it have none).
        below = [v - r[f"{key}_ci_low"] if r[f"{key}_ci_low"] is not None else 0.0 for v, r in zip(values, rows)]
        above = [r[f"{key}_ci_high"] - v if r[f"{key}_ci_high"] is not None else 0.0 for v, r in zip(values, rows)]
        width = 0.8 / len(SPLITS)
        ax.bar(x + (i - (len(SPLITS) - 1) / 2) * width, values, width, yerr=[below, above], capsize=3, label=split)
    ax.set_xticks(x, [r["run"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("rsum (sum of R@1/5/10, both directions)")
    ax.set_title("EntityCLIP runs: seen, unseen entities and composition (bars: 95% CI over test queries)")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.08), ncol=len(SPLITS), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def html_report(rows: list[dict], experiment: str, path: str) -> str:
    """The tables and the chart in one HTML file (the chart inlined): opens anywhere, offline."""
    import base64
    import html
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        chart = base64.b64encode(Path(plot(rows, f"{tmp}/chart.png")).read_bytes()).decode()
    head = "".join(f"<th>{html.escape(m.split('/')[0])}<br>{html.escape(m.split('/')[1])}</th>" for m in METRICS)

    def cell(r: dict, metric: str) -> str:
        value, low, high = r[metric], r[f"{metric}_ci_low"], r[f"{metric}_ci_high"]
        if value is None:
            return "<td>-</td>"
        interval = "" if low is None else f"<br><small>[{low:.1f}, {high:.1f}]</small>"
        return f"<td>{value:.1f}{interval}</td>"

    body = "".join(
        f"<tr><td>{html.escape(r['run'])}</td><td>{html.escape(r['variant'])}</td>"
        + "".join(cell(r, m) for m in METRICS) + "</tr>" for r in rows)
    groups = seed_groups(rows)
    seeds = "" if not groups else (
        "<h2>Over seeds (runs that differ only by train.seed)</h2><table><tr><th>group</th><th>configuration</th>"
        "<th>seeds</th>" + "".join(f"<th>{s} rsum<br>mean [95% CI]</th><th>sd (min-max)</th>" for s in SPLITS) + "</tr>"
        + "".join(f"<tr><td>{g.id}</td><td>{html.escape(g.label)}</td><td>{html.escape(','.join(g.seeds))}</td>"
                  + "".join(f"<td>{v.mean:.1f} [{v.ci_low:.1f}, {v.ci_high:.1f}]</td>"
                            f"<td>{v.std:.1f} ({v.low:.1f}-{v.high:.1f})</td>" if (v := g.rsum.get(s))
                            else "<td>-</td><td>-</td>" for s in SPLITS) + "</tr>" for g in groups)
        + "</table>")
    Path(path).write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>EntityCLIP runs: {html.escape(experiment)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}</style>
</head><body><h1>Recall@K (%) of experiment {html.escape(experiment)}</h1>
<p>Each figure with its 95% bootstrap interval over test queries.</p>
<table><tr><th>run</th><th>variant</th>{head}</tr>{body}</table>{seeds}
<p><img alt="rsum per run, seen and unseen entities" src="data:image/png;base64,{chart}"></p></body></html>
""")
    return path


def promote_best(cfg: PipelineConfig, metric: str, alias: str = "champion", sweep: str | None = None,
                 force: bool = False) -> dict:
    """Set `alias` on the model version of the compared run (or sweep trial) that is best by
    `metric` (higher is better) among those that registered a model, as served by default (a
    re-ranked row counts for the variants whose retrieval it defines, rerank.py), if it is
    significantly better than the version the alias names now (a paired test on the same test
    queries), or with `force`. Registered models are one per variant
    (`<tracking.registered_model>-<variant>`). The answer says what happened and why."""
    if metric not in METRICS:
        raise ConfigError(f"cannot promote by {metric!r}; choose one of {METRICS}")
    rows = collect(cfg, sweep)
    candidates = [r for r in rows if r[metric] is not None and r["served"]]
    tracker = tracker_for(cfg)
    for best in sorted(candidates, key=lambda r: r[metric], reverse=True):
        registered = tracker.version_of_run(best["run_id"])
        if registered:  # an evaluated run that registered no model has nothing to promote
            break
    else:
        where = f"sweep {sweep!r} of " if sweep else ""
        raise ConfigError(f"no evaluated runs with a registered model in {where}experiment "
                          f"{cfg.tracking.experiment!r} to promote")
    name, version = registered
    out = {"model": name, "version": version, "alias": alias, "run": best["run"], metric: best[metric]}
    current = tracker.alias_version(name, alias)
    if current is None:
        reason = f"{name} had no {alias!r} yet"
    elif current[0] == version:
        return {**out, "promoted": False, "reason": f"version {version} already is {name}@{alias}"}
    else:
        # The champion may come from outside this experiment or sweep: read its own run.
        champion = [r for r in rows_of(tracker.run(current[1])) if r["served"]]
        if not champion:
            test, reason = None, f"{name}@{alias} (version {current[0]}) has no evaluation to compare with"
        else:
            try:
                test = paired(cfg, [best], champion, metric)
                reason = f"version {version} vs {alias} version {current[0]}: {test.sentence()}"
            except ConfigError as exc:  # e.g. the champion was evaluated before per-query results
                test, reason = None, f"cannot compare with {alias} version {current[0]}: {exc}"
            out["paired"] = None if test is None else test.__dict__
        better = test is not None and test.significant and test.difference > 0
        if not better and not force:
            return {**out, "promoted": False, "reason": reason + "; --force promotes anyway"}
        if not better:
            reason += "; promoted by --force"
    tracker.set_alias(name, version, alias)
    return {**out, "promoted": True, "reason": reason}


def compare_runs(cfg: PipelineConfig, plot_path: str | None = None, html_path: str | None = None,
                 sweep: str | None = None) -> tuple[str, list[str]]:
    """(the run table, with the seed-group table below it where runs differ only by seed; files
    written)."""
    rows = collect(cfg, sweep)
    if not rows:
        return f"no evaluated runs in experiment {cfg.tracking.experiment!r}", []
    written = [plot(rows, plot_path)] if plot_path else []
    if html_path:
        written.append(html_report(rows, cfg.tracking.experiment, html_path))
    text = table(rows)
    groups = seed_groups(rows)
    if groups:
        text += "\n\nOver seeds (runs that differ only by train.seed; CI: t-interval of the mean over seeds)\n"
        text += seed_table(groups)
    if len(groups) > 1:
        text += "\n\n" + against_best(cfg, rows, groups)
    return text, written


def against_best(cfg: PipelineConfig, rows: list[dict], groups: list[SeedGroup],
                 metric: str = "test_unseen/rsum") -> str:
    """Each seed group tested against the best one by `metric` on the same test queries: which
    differences are real."""
    split = _split_metric(metric)[0]
    ranked = sorted((g for g in groups if split in g.rsum), key=lambda g: g.rsum[split].mean, reverse=True)
    best = ranked[0]
    lines = [f"Paired against the best group by {metric}, {best.id} ({best.label}):"]
    members = {g.id: [r for r in rows if r["group"] == g.id] for g in ranked}
    for g in ranked[1:]:
        try:
            lines.append(f"  {g.id}: {paired(cfg, members[g.id], members[best.id], metric).sentence()}")
        except ConfigError as exc:  # e.g. runs evaluated before per-query results were kept
            lines.append(f"  {g.id}: cannot be tested ({exc})")
    return "\n".join(lines)
