"""Compare tracked runs: one row per run of the experiment, and a bar chart of rsum."""

from __future__ import annotations

from entityclip.config import PipelineConfig
from entityclip.pipeline import RunPaths, tracker_for

COLUMNS = ["t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "rsum"]
SPLITS = ["test_seen", "test_unseen"]


def collect(cfg: PipelineConfig) -> list[dict]:
    rows = []
    for run in tracker_for(cfg, RunPaths.for_config(cfg)).runs(cfg.tracking.experiment):
        m = run.data.metrics
        if not any(k.startswith("test_") for k in m):
            continue  # unfinished or failed runs have no evaluation
        rows.append({"run": run.info.run_name, "variant": run.data.tags.get("variant", "?"),
                     **{f"{s}/{c}": m.get(f"{s}/{c}") for s in SPLITS for c in COLUMNS}})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'run':<34} " + " ".join(f"{s.split('_')[1][:6]}/{c:<7}" for s in SPLITS for c in COLUMNS)
    lines = [head]
    for r in rows:
        cells = [r[f"{s}/{c}"] for s in SPLITS for c in COLUMNS]
        lines.append(f"{r['run']:<34} " + " ".join(f"{'-' if v is None else f'{v:.1f}':>14}" for v in cells))
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_runs(cfg: PipelineConfig, plot_path: str | None = None) -> tuple[str, str | None]:
    rows = collect(cfg)
    if not rows:
        return f"no evaluated runs in experiment {cfg.tracking.experiment!r}", None
    return table(rows), plot(rows, plot_path) if plot_path else None
