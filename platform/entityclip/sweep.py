"""Hyperparameter sweeps: a Ray Tune search over config fields, each trial the same stages as
`entityclip train` (train → index → evaluate → register), tracked as one MLflow run of the
experiment tagged `sweep=<name>` and `param.<field>=<value>`, so that `entityclip compare
--sweep NAME --promote METRIC` ranks the trials and promotes the best.

Search space, one `FIELD=SPEC` per swept field:
  train.lr=0.001,0.003        a grid (every value, crossed with the other grids)
  train.lr=loguniform:1e-4:1e-2   sampled (also uniform:LOW:HIGH), `samples` times
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from entityclip.config import PipelineConfig, apply_overrides, from_dict, to_dict
from entityclip.errors import ConfigError, EntityClipError, find_user_error
from entityclip.paths import RunPaths

DISTRIBUTIONS = ("uniform", "loguniform")


def parse_space(specs: list[str]):
    """`FIELD=SPEC` strings → a Tune search space {field: domain}."""
    from ray import tune

    space = {}
    for spec in specs:
        field, sep, values = spec.partition("=")
        if not sep or not field or not values:
            raise ConfigError(f"sweep parameter {spec!r} must look like section.field=v1,v2 or "
                              "section.field=loguniform:LOW:HIGH")
        kind, _, bounds = values.partition(":")
        if kind in DISTRIBUTIONS:
            try:
                low, high = (float(b) for b in bounds.split(":"))
            except ValueError:
                raise ConfigError(f"sweep parameter {spec!r}: {kind} needs LOW:HIGH numbers") from None
            space[field] = getattr(tune, kind)(low, high)
        else:
            space[field] = tune.grid_search(values.split(","))
    if not space:
        raise ConfigError("a sweep needs at least one parameter, e.g. --param train.lr=0.001,0.003")
    return space


def _overrides(params: dict) -> list[str]:
    return [f"{field}={value}" for field, value in params.items()]


def trial(config: dict) -> None:
    """One Tune trial (a function trainable): the train command's stages for one point."""
    from ray import tune

    from entityclip.pipeline import train_variant

    # Tune starts trials in their own folder; relative paths mean what they meant to the caller.
    os.chdir(config["cwd"])
    cfg = from_dict(PipelineConfig, apply_overrides(config["base"], _overrides(config["params"])))
    tags = {"sweep": config["sweep"], **{f"param.{k}": str(v) for k, v in config["params"].items()}}
    done = train_variant(cfg, progress=False, tags=tags)
    tune.report({f"{split}/{k}": v for split, m in done.metrics.items() for k, v in m.items()}
                | {"run_id": done.train.run_id, "model": done.model.uri})


def _one_line(error: BaseException) -> str:
    """A failed trial: the user error inside it (bad config, data), else the error's first line."""
    found = find_user_error(error)
    return str(found) if found else str(error).strip().splitlines()[0][:300]


@dataclass
class SweepResult:
    name: str
    metric: str
    trials: list[dict]  # params, the metric and its interval, run id and model URI per finished trial, best first
    failed: list[str]  # one line per failed trial


def _progress_bar(total: int, enabled: bool):
    """A Tune callback that counts finished trials on a progress bar."""
    from ray import tune
    from tqdm import tqdm

    class TrialBar(tune.Callback):
        def __init__(self):
            self.bar = tqdm(total=total, desc="sweep", unit="trial", disable=not enabled)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.bar.update(1)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.bar.update(1)

        def on_experiment_end(self, trials, **info):
            self.bar.close()

    return TrialBar()


def run_sweep(cfg: PipelineConfig, specs: list[str], metric: str, samples: int = 1, concurrent: int = 1,
              name: str | None = None, progress: bool = True) -> SweepResult:
    from ray import tune

    from entityclip.compare import METRICS
    from entityclip.runtime import init_ray

    if metric not in METRICS:
        raise ConfigError(f"cannot rank trials by {metric!r}; choose one of {METRICS}")
    space = parse_space(specs)
    # Every swept field must exist and parse: fail here, not in every trial.
    first = {k: (v["grid_search"][0] if isinstance(v, dict) else v.sample()) for k, v in space.items()}
    from_dict(PipelineConfig, apply_overrides(to_dict(cfg), _overrides(first)))
    name = name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = RunPaths.for_config(cfg)
    # Tune's newer console output prints a summary box even when told to be silent.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    init_ray()
    grids = [len(v["grid_search"]) for v in space.values() if isinstance(v, dict)]
    tuner = tune.Tuner(
        # The trial only drives: Ray Train's workers and Ray Data's tasks reserve their own CPUs.
        tune.with_resources(trial, {"CPU": 0.01}),
        param_space={"base": to_dict(cfg), "params": space, "sweep": name, "cwd": os.getcwd()},
        tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=samples,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str((paths.local / "ray_results").resolve()), verbose=0,
                                  callbacks=[_progress_bar(samples * math.prod(grids), progress)]),
    )
    grid = tuner.fit()
    finished = sorted((r for r in grid if r.error is None and r.metrics and metric in r.metrics),
                      key=lambda r: -r.metrics[metric])
    failed = [_one_line(r.error) for r in grid if r.error is not None]
    if not finished:
        raise EntityClipError(f"every trial of sweep {name} failed: {failed[:3]}")
    trials = [{"params": r.config["params"], metric: r.metrics[metric], "run_id": r.metrics["run_id"],
               "model": r.metrics["model"],
               **{f"{metric}{end}": r.metrics.get(f"{metric}{end}") for end in ("_ci_low", "_ci_high")}}
              for r in finished]
    return SweepResult(name, metric, trials, failed)
