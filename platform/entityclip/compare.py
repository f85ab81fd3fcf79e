"""Compare tracked runs: one row per run of the experiment, a bar chart of rsum, and both as
one self-contained HTML report."""

from __future__ import annotations

from entityclip.config import PipelineConfig
from entityclip.errors import ConfigError
from entityclip.rerank import DEFINING
from entityclip.train.tracking import tracker_for

COLUMNS = ["t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "rsum"]
SPLITS = ["test_seen", "test_unseen"]


def collect(cfg: PipelineConfig, sweep: str | None = None) -> list[dict]:
    """One row per evaluated run of the experiment (only sweep `sweep`'s trials, if given)."""
    rows = []
    for run in tracker_for(cfg).runs(cfg.tracking.experiment):
        m, tags = run.data.metrics, run.data.tags
        if not any(k.startswith("test_") for k in m):
            continue  # unfinished or failed runs have no evaluation
        if sweep is not None and tags.get("sweep") != sweep:
            continue
        params = " ".join(f"{k[len('param.'):]}={v}" for k, v in sorted(tags.items()) if k.startswith("param."))
        # A re-ranked evaluation logs "<reranker>/<split>/<metric>" (pipeline.stage_evaluate);
        # `served` marks the row that serve.rerank's default (auto) serves.
        rerankers = sorted({k.split("/")[0] for k in m if k.count("/") == 2 and k.split("/")[1] in SPLITS})
        served = next((r for r in rerankers if r in DEFINING), "")
        for reranker in ["", *rerankers]:
            prefix = f"{reranker}/" if reranker else ""
            rows.append({"run": run.info.run_name + (f" +{reranker}" if reranker else ""),
                         "run_id": run.info.run_id, "variant": tags.get("variant", "?"),
                         "sweep": tags.get("sweep", ""), "params": params, "reranker": reranker,
                         "served": reranker == served,
                         **{f"{s}/{c}": m.get(f"{prefix}{s}/{c}") for s in SPLITS for c in COLUMNS}})
    return rows


def table(rows: list[dict]) -> str:
    """The recall table; sweep trials also show the values they were run with."""
    width = max([34, *(len(r["run"]) for r in rows)])
    head = f"{'run':<{width}} " + " ".join(f"{s.split('_')[1][:6]}/{c:<7}" for s in SPLITS for c in COLUMNS)
    with_params = any(r["params"] for r in rows)
    lines = [head + ("  params" if with_params else "")]
    for r in rows:
        cells = [r[f"{s}/{c}"] for s in SPLITS for c in COLUMNS]
        line = f"{r['run']:<{width}} " + " ".join(f"{'-' if v is None else f'{v:.1f}':>14}" for v in cells)
        lines.append(line + (f"  {r['params']}" if with_params else ""))
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    x = np.arange(len(rows))
    for i, split in enumerate(SPLITS):
        ax.bar(x + (i - 0.5) * 0.38, [r[f"{split}/rsum"] or 0 for r in rows], 0.38, label=split)
    ax.set_xticks(x, [r["run"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("rsum (sum of R@1/5/10, both directions)")
    ax.set_title("EntityCLIP runs: seen vs unseen entities")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.08), ncol=len(SPLITS), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def html_report(rows: list[dict], experiment: str, path: str) -> str:
    """The table and the chart in one HTML file (the chart inlined): opens anywhere, offline."""
    import base64
    import html
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        chart = base64.b64encode(Path(plot(rows, f"{tmp}/chart.png")).read_bytes()).decode()
    head = "".join(f"<th>{html.escape(s)}<br>{html.escape(c)}</th>" for s in SPLITS for c in COLUMNS)
    def cell(value: float | None) -> str:
        return "<td>-</td>" if value is None else f"<td>{value:.1f}</td>"

    body = "".join(
        f"<tr><td>{html.escape(r['run'])}</td><td>{html.escape(r['variant'])}</td>"
        + "".join(cell(r[f"{s}/{c}"]) for s in SPLITS for c in COLUMNS) + "</tr>" for r in rows)
    Path(path).write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>EntityCLIP runs: {html.escape(experiment)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}</style>
</head><body><h1>Recall@K (%) of experiment {html.escape(experiment)}</h1>
<table><tr><th>run</th><th>variant</th>{head}</tr>{body}</table>
<p><img alt="rsum per run, seen and unseen entities" src="data:image/png;base64,{chart}"></p></body></html>
""")
    return path


METRICS = [f"{s}/{c}" for s in SPLITS for c in COLUMNS]


def promote_best(cfg: PipelineConfig, metric: str, alias: str = "champion", sweep: str | None = None) -> dict:
    """Set `alias` on the model version of the compared run (or sweep trial) that is best by
    `metric` (higher is better) among those that registered a model, as served by default (a
    re-ranked row counts for the variants whose retrieval it defines, rerank.py). Registered
    models are one per variant (`<tracking.registered_model>-<variant>`)."""
    if metric not in METRICS:
        raise ConfigError(f"cannot promote by {metric!r}; choose one of {METRICS}")
    rows = [r for r in collect(cfg, sweep) if r[metric] is not None and r["served"]]
    tracker = tracker_for(cfg)
    for best in sorted(rows, key=lambda r: r[metric], reverse=True):
        registered = tracker.version_of_run(best["run_id"])
        if registered:  # an evaluated run that registered no model has nothing to promote
            name, version = registered
            tracker.set_alias(name, version, alias)
            return {"model": name, "version": version, "alias": alias, "run": best["run"], metric: best[metric]}
    where = f"sweep {sweep!r} of " if sweep else ""
    raise ConfigError(f"no evaluated runs with a registered model in {where}experiment "
                      f"{cfg.tracking.experiment!r} to promote")


def compare_runs(cfg: PipelineConfig, plot_path: str | None = None, html_path: str | None = None,
                 sweep: str | None = None) -> tuple[str, list[str]]:
    """(table text, files written)."""
    rows = collect(cfg, sweep)
    if not rows:
        return f"no evaluated runs in experiment {cfg.tracking.experiment!r}", []
    written = [plot(rows, plot_path)] if plot_path else []
    if html_path:
        written.append(html_report(rows, cfg.tracking.experiment, html_path))
    return table(rows), written
