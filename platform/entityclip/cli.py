"""`entityclip`: one command line for every stage of the platform.

Each subcommand takes --config FILE and any number of --set section.field=value overrides;
`entityclip config` prints the full default config to start a file from.
"""

from __future__ import annotations

import argparse
import json
import sys

from entityclip.config import PipelineConfig, config_reference, dump_config, load_config
from entityclip.errors import EntityClipError, find_user_error
from entityclip.models.entityclip import VARIANTS
from entityclip.runtime import set_verbose


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see `entityclip config`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--root", help="storage root: a local folder or s3://bucket/prefix (= --set storage.root=...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show Ray, Serve and MLflow INFO logs")


def _cfg(args) -> PipelineConfig:
    overrides = list(args.overrides) + ([f"storage.root={args.root}"] if getattr(args, "root", None) else [])
    return load_config(args.config, overrides)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` → [0, 1, 2]."""
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise EntityClipError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise EntityClipError(f"--seeds repeats a seed: {text!r}")
    return seeds


TABLE_COLUMNS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "t2i_map10"]


def _table(results: dict) -> str:
    """One line per model and split; each figure ± half its 95% bootstrap interval."""
    from entityclip.compare import with_interval

    lines = [f"{'model':<24} {'split':<16} " + " ".join(f"{c:>11}" for c in TABLE_COLUMNS)]
    for name, r in results.items():
        for split, m in r["metrics"].items():
            cells = [with_interval(m.get(c), m.get(f"{c}_ci_low"), m.get(f"{c}_ci_high")) for c in TABLE_COLUMNS]
            lines.append(f"{name:<24} {split:<16} " + " ".join(f"{c:>11}" for c in cells))
    lines.append("± is half the width of the 95% bootstrap interval over the split's test queries")
    return "\n".join(lines)


def _seed_summary(results: dict) -> str:
    """Per variant and split trained with several seeds: rsum's mean and t-interval over seeds."""
    from entityclip.stats import over_seeds

    by_variant: dict[tuple[str, str], list[float]] = {}
    for r in results.values():
        for split, m in r["metrics"].items():
            by_variant.setdefault((r["variant"], split), []).append(m["rsum"])
    lines = []
    for (variant, split), values in by_variant.items():
        if len(values) > 1:
            v = over_seeds(values)
            lines.append(f"  {variant:<22} {split:<16} rsum {v.mean:.1f} [{v.ci_low:.1f}, {v.ci_high:.1f}] "
                         f"sd {v.std:.1f}, {v.low:.1f}-{v.high:.1f} over {v.n} seeds")
    return "\n".join(lines)


def cmd_config(args) -> None:
    print(config_reference() if args.reference else dump_config(_cfg(args), docs=True), end="")


def cmd_data(args) -> None:
    from entityclip.pipeline import stage_data

    _print(stage_data(_cfg(args), progress=not args.no_progress))


def cmd_lm(args) -> None:
    from entityclip.pipeline import stage_lm

    _print(stage_lm(_cfg(args), progress=not args.no_progress))


def cmd_explain(args) -> None:
    from entityclip.pipeline import stage_explain

    _print(stage_explain(_cfg(args), progress=not args.no_progress).__dict__)


def cmd_train(args) -> None:
    from entityclip.pipeline import train_variant, with_seed

    cfg = _cfg(args)
    seeds = _seeds(args.seeds)
    if seeds and args.resume:
        raise EntityClipError("--resume continues one run: give its seed with --set train.seed=N, not --seeds")
    out = {}
    for seed in seeds or [cfg.train.seed]:
        done = train_variant(with_seed(cfg, seed), progress=not args.no_progress, resume=args.resume,
                             evaluate=not args.no_eval)
        out[str(seed)] = {"train": done.train.__dict__, "model": done.model.uri,
                          **({"evaluate": done.metrics} if done.metrics is not None else {})}
    _print(out if seeds else out[str(cfg.train.seed)])


def cmd_index(args) -> None:
    from entityclip.pipeline import stage_index

    _print(stage_index(_cfg(args)).__dict__)


def cmd_evaluate(args) -> None:
    from entityclip.pipeline import stage_evaluate

    _print(stage_evaluate(_cfg(args), args.run_id))


def cmd_serve(args) -> None:
    from entityclip.serving.deploy import start_serving

    cfg = _cfg(args)
    if args.model:
        cfg.serve.model = args.model
    start_serving(cfg, blocking=True)


def cmd_query(args) -> None:
    from entityclip.serving.client import ServeClient

    if args.text is None and args.image is None:
        raise EntityClipError("give --text, --image, or both (a composed query)")
    client = ServeClient(args.url)
    if args.image:
        try:
            image = Path(args.image).read_bytes()
        except OSError as exc:
            raise EntityClipError(f"cannot read {args.image} ({exc.strerror})") from None
        _print(client.search_composed(image, args.text, args.k) if args.text is not None
               else client.search_image(image, args.k))
    else:
        _print(client.search_text(args.text, args.k))


def cmd_pipeline(args) -> None:
    from entityclip.pipeline import run_pipeline

    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise EntityClipError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    summary = run_pipeline(_cfg(args), variants, serve_query=not args.no_serve,
                           keep_serving=args.keep_serving, progress=not args.no_progress, seeds=_seeds(args.seeds))
    print("\nRecall@K and mAP@10 (%) per test split")
    print(_table(summary["results"]))
    over = _seed_summary(summary["results"])
    if over:
        print("\nOver seeds (95% t-interval of the mean; `entityclip compare` tests differences)")
        print(over)
    print("\nRegistered models (promote one with `entityclip promote NAME VERSION`):")
    for name, r in summary["results"].items():
        print(f"  {name:<24} {r['model']}")
    print("\nStage seconds:", json.dumps(summary["seconds"]))
    if "query" in summary:
        q = summary["query"]
        print(f"\nServe query {q['url']}: {q['text']!r}")
        print(f"  explanation: {q['answer']['explanation']}")
        for hit in q["answer"]["results"]:
            mark = "  <- the query's own image" if hit["sample_id"] == q["expected_sample"] else ""
            print(f"  {hit['score']:.3f} {hit['sample_id']} ({hit['split']}) {hit['text']}{mark}")
    print(f"\nSummary written to {summary['root']}/summary.json")
    if args.keep_serving:
        import time

        print("serving until Ctrl-C")
        while True:
            time.sleep(3600)


def cmd_compare(args) -> None:
    from entityclip.compare import compare_pair, compare_runs, promote_best

    cfg = _cfg(args)
    table, written = compare_runs(cfg, args.plot, args.html, args.sweep)
    print(table)
    for path in written:
        print(f"written: {path}")
    if args.paired:
        result = compare_pair(cfg, *args.paired, metric=args.metric, sweep=args.sweep)
        print(f"\npaired, {args.paired[0]} minus {args.paired[1]}: {result.sentence()}")
    if args.promote:
        _print(promote_best(cfg, args.promote, sweep=args.sweep, force=args.force))


def cmd_sweep(args) -> None:
    from entityclip.sweep import run_sweep

    result = run_sweep(_cfg(args), args.param, args.metric, args.samples, args.concurrent, args.name,
                       progress=not args.no_progress)
    print(f"sweep {result.name}: {len(result.trials)} trials finished, {len(result.failed)} failed; best first")
    from entityclip.compare import with_interval

    for t in result.trials:
        params = " ".join(f"{k}={v}" for k, v in t["params"].items())
        value = with_interval(t[result.metric], t[f"{result.metric}_ci_low"], t[f"{result.metric}_ci_high"])
        print(f"  {result.metric}={value}  {params}  run {t['run_id']}  {t['model']}")
    for line in result.failed:
        print(f"  failed: {line}")
    print(f"(± half the 95% interval over test queries; `entityclip compare --sweep {result.name} --paired A B` "
          "tests two trials against each other)")
    print(f"`entityclip compare --sweep {result.name} --promote {result.metric}` promotes the best trial")


def cmd_promote(args) -> None:
    from entityclip.tracking import tracker_for

    cfg = _cfg(args)
    tracker_for(cfg).set_alias(args.model, args.version, args.alias)
    _print({"model": args.model, "version": args.version, "alias": args.alias})


def cmd_submit(args) -> None:
    from entityclip.jobs import submit_job

    _print(submit_job(args.address, args.entrypoint, args.working_dir, wait=not args.no_wait))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entityclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    p = add("config", cmd_config, "print the resolved config as YAML, every field's documentation above it")
    _config_args(p)
    p.add_argument("--reference", action="store_true",
                   help="print the configuration reference page instead (docs/configuration.md)")
    _config_args(add("data", cmd_data, "generate or ingest the dataset (samples.parquet, images) and write the training shards"))
    _config_args(add("lm", cmd_lm, "train the synthetic world's LM into <root>/lm (explain.model=world "
                     "serves it with vLLM)"))
    _config_args(add("explain", cmd_explain, "write explanations.parquet with Ray Data engine actors"))
    p = add("train", cmd_train, "train one variant with Ray Train DDP, tracked in MLflow")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the variant's interrupted training run "
                   "from its last checkpoint (same Ray Train run and MLflow run; give the same config)")
    p.add_argument("--no-eval", action="store_true", help="skip indexing and evaluation after training "
                   "(the registered model then has no gallery index: it embeds but does not search)")
    p.add_argument("--seeds", metavar="S1,S2,...", help="train, evaluate and register once per training seed "
                   "(train.seed), e.g. 0,1,2; `entityclip compare` summarizes them over seeds")
    _config_args(add("index", cmd_index, "embed the gallery with a checkpoint (Ray Data) into an index"))
    p = add("evaluate", cmd_evaluate, "Recall@1/5/10 both directions from the index")
    _config_args(p)
    p.add_argument("--run-id", help="MLflow run to log the metrics to")
    p = add("serve", cmd_serve, "deploy the Ray Serve retrieval app and block; where the app already runs "
            "(a Ray cluster this command joins), update it in place and return")
    _config_args(p)
    p.add_argument("--model", help="a registered version to serve: models:/NAME@ALIAS or models:/NAME/VERSION "
                   "(= --set serve.model=...); default: the run root's checkpoint of model.variant")
    p = add("query", cmd_query, "send a query to a running Serve app (the API key, where the app wants one, "
            "from $ENTITYCLIP_API_KEY; a request the app lost to a dying replica is sent again)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--text", help="text → image search")
    p.add_argument("--image", help="image file → text search; with --text, a composed query → images "
                   "(the image changed as the text says)")
    p.add_argument("-k", type=int, default=5)
    p = add("pipeline", cmd_pipeline, "the whole job: data → explain → train → index → evaluate → serve")
    _config_args(p)
    p.add_argument("--variants", default="entityclip", help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--no-serve", action="store_true", help="skip the Serve deployment and query")
    p.add_argument("--keep-serving", action="store_true", help="leave the Serve app running at the end")
    p.add_argument("--seeds", metavar="S1,S2,...", help="train each variant once per training seed (train.seed), "
                   "e.g. 0,1,2, on the same data and explanations; the table adds the mean over seeds")
    p = add("compare", cmd_compare, "compare tracked runs of the experiment (table + plot)")
    _config_args(p)
    p.add_argument("--plot", help="write a bar chart PNG here")
    p.add_argument("--html", help="write the table and chart as one HTML report here")
    p.add_argument("--promote", metavar="METRIC", help="set alias 'champion' on the best run's model version "
                   "by this metric, e.g. test_unseen/rsum, if a paired test on the same test queries finds it "
                   "significantly better (95%%) than the current champion")
    p.add_argument("--force", action="store_true", help="with --promote: promote even without a significant gain")
    p.add_argument("--paired", nargs=2, metavar=("A", "B"), help="paired test of A against B on the same test "
                   "queries: each a run name or id, or a seed group id (all its seeds)")
    p.add_argument("--metric", default="test_unseen/rsum", help="the metric --paired compares "
                   "(split/metric, e.g. test_seen/t2i_map10; default test_unseen/rsum)")
    p.add_argument("--sweep", metavar="NAME", help="only the trials of this sweep")
    p = add("sweep", cmd_sweep, "a Ray Tune search over config fields; each trial trains, evaluates and "
            "registers like `train`, as one MLflow run of the experiment")
    _config_args(p)
    p.add_argument("--param", action="append", default=[], metavar="FIELD=SPEC", required=True,
                   help="a swept field: a grid (train.lr=0.001,0.003) or a distribution sampled --samples times "
                   "(train.lr=loguniform:1e-4:1e-2, uniform:LOW:HIGH); repeatable")
    p.add_argument("--metric", default="test_unseen/rsum", help="what ranks the trials (higher is better)")
    p.add_argument("--samples", type=int, default=1, help="Tune's num_samples: draws of the distributions "
                   "(each crossed with the whole grid)")
    p.add_argument("--concurrent", type=int, default=1, help="trials at once (each runs train.num_workers workers)")
    p.add_argument("--name", help="the sweep's name (default sweep-<time>)")
    p = add("promote", cmd_promote, "set an alias (e.g. champion) on a registered model version")
    _config_args(p)
    p.add_argument("model", help="registered model name, e.g. entityclip-entityclip")
    p.add_argument("version", help="its version number")
    p.add_argument("--alias", default="champion", help="the alias to set (default champion)")
    p = add("submit", cmd_submit, "submit a command to a Ray cluster as a Ray Job")
    p.add_argument("--address", default="http://127.0.0.1:8265",
                   help="Ray dashboard / Jobs API address; a cluster with token auth wants its token in "
                        "$RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("entrypoint", help="shell command the job runs, e.g. 'python jobs/pipeline.py'")
    return parser


RAY_DATA_RETRY_NOTE = "\nFailed to apply UDF transform"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        err = find_user_error(exc)
        if err is None:
            raise
        # Ray Data appends retry advice to a failed map's message; it does not apply to bad input.
        print(f"error: {str(err).split(RAY_DATA_RETRY_NOTE)[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
