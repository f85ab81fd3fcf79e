"""The stages of a run and the whole pipeline:
data → explain → train → index → evaluate → register → serve.

Every stage reads and writes under the storage root (`RunPaths`), so stages can run one at a
time (CLI subcommands, Ray Jobs) or all together (`run_pipeline`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from entityclip import publish, storage
from entityclip.config import PipelineConfig
from entityclip.errors import ConfigError, EntityClipError
from entityclip.paths import RunPaths, model_key, require
from entityclip.runtime import init_ray, quiet_logs
from entityclip.serving.client import ServeClient
from entityclip.train.tracking import EXPLANATIONS_TAG, QUERY_RESULTS_ARTIFACT, tracker_for


def stage_data(cfg: PipelineConfig, progress: bool = True) -> dict:
    """The synthetic benchmark, or a real dataset's own format ingested into samples.parquet;
    then the training shards (samples with their image bytes)."""
    from entityclip.data.shards import write_shards

    paths = RunPaths.for_config(cfg)
    if cfg.data.source == "synthetic":
        from entityclip.data.synthetic import generate

        out = generate(cfg.data, storage.join(paths.root, "data"), progress=progress)
    else:
        from entityclip.data.formats import ingest
        from entityclip.data.samples import samples_table

        if not cfg.data.source_path:
            raise ConfigError(f"data.source={cfg.data.source} needs data.source_path (the dataset's folder)")
        rows, counts = ingest(cfg.data.source, cfg.data.source_path, cfg.data.skip_missing_images)
        if cfg.data.boxes_path:
            from entityclip.data.detections import attach_boxes, read_detections

            counts["with_boxes"] = attach_boxes(rows, read_detections(cfg.data.boxes_path, cfg.data.boxes_min_score))
        storage.write_parquet(paths.samples, samples_table(rows))
        out = {"samples": paths.samples, **counts, "written": len(rows)}
    init_ray()
    manifest = write_shards(paths.samples, paths.shards, cfg.data.shard_rows, cfg.data.seed)
    return {**out, "shards": paths.shards, **{f"{k}_rows": v["rows"] for k, v in manifest["splits"].items()}}


def check_world_lm(cfg: PipelineConfig) -> None:
    if cfg.data.source != "synthetic":
        raise ConfigError("explain.model=world is the synthetic world's LM; for a real dataset set explain.model "
                          "to a local LLM folder (or explain.engine=knowledge only for synthetic data)")


def stage_lm(cfg: PipelineConfig) -> dict:
    """Train the synthetic world's LM (explain/world_lm.py) into <root>/lm, in vLLM's environment;
    returns what training measured. An LM already trained on the same world with the same
    steps and seed is kept."""
    import hashlib
    import json
    import subprocess

    from entityclip.explain.engines import llm_python

    check_world_lm(cfg)
    paths = RunPaths.for_config(cfg)
    entities = require(paths.entities, "data")
    if storage.is_s3(paths.root):
        raise ConfigError("the world LM is trained into a local run root (vLLM loads a local folder)")
    facts_uri = storage.join(paths.world_lm, "training.json")
    wanted = {"steps": cfg.explain.world_lm_steps, "seed": cfg.data.seed,
              "entities_sha256": hashlib.sha256(storage.read_bytes(entities)).hexdigest()}
    if storage.exists(facts_uri):
        facts = storage.read_json(facts_uri)
        if all(facts.get(k) == v for k, v in wanted.items()):
            return facts
    python = llm_python(cfg.explain)
    if not python:
        raise ConfigError("training the world LM needs .venv-llm (./scripts/setup makes it) or explain.python")
    done = subprocess.run([python, "-m", "entityclip.explain.world_lm", entities, paths.world_lm,
                           "--steps", str(cfg.explain.world_lm_steps), "--seed", str(cfg.data.seed)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EntityClipError(f"training the world LM failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_explain(cfg: PipelineConfig, progress: bool = True):
    from entityclip.explain.engines import run_explain_config
    from entityclip.explain.pipeline import run_explain

    paths = RunPaths.for_config(cfg)
    samples = require(paths.samples, "data")
    if cfg.explain.engine == "knowledge" and not storage.exists(paths.entities):
        raise ConfigError("the knowledge engine reads the synthetic world's entities.parquet; "
                          "for a real dataset use explain.engine=vllm")
    explain = run_explain_config(cfg)
    if explain.model == paths.world_lm:
        check_world_lm(cfg)
        require(storage.join(paths.world_lm, "config.json"), "lm")
    init_ray()
    return run_explain(explain, samples, paths.entities, paths.explanations, progress=progress)


def stage_train(cfg: PipelineConfig, progress: bool = True, resume: bool = False):
    from entityclip.train.trainer import run_training

    paths = RunPaths.for_config(cfg)
    require(paths.explanations, "explain")
    run_paths = paths.as_dict()
    teacher = cfg.train.reinforce_teacher
    if teacher:
        from entityclip.train.reinforce import teacher_uri, write_teacher_embeddings

        if teacher == cfg.model.variant:
            raise ConfigError(f"train.reinforce_teacher is {teacher}, the variant being trained: pick another run")
        # Written afresh each time, so a retrained teacher never leaves stale embeddings behind.
        run_paths["teacher"] = teacher_uri(paths.shards, teacher)
        write_teacher_embeddings(paths.index(teacher), paths.checkpoint(teacher), run_paths["teacher"])
    tracker = tracker_for(cfg)
    return run_training(cfg, run_paths, tracker, paths.local / "ray_results", progress, resume)


def stage_index(cfg: PipelineConfig):
    from entityclip.index import build_index

    paths, key = RunPaths.for_config(cfg), model_key(cfg)
    checkpoint = paths.checkpoint(key)
    publish.require(checkpoint, "model.json", "train")
    init_ray()
    return build_index(checkpoint, paths.samples, require(paths.explanations, "explain"), paths.index(key), cfg.index)


def stage_evaluate(cfg: PipelineConfig, run_id: str | None = None) -> dict:
    """Recall@K and mAP@10 with 95% intervals per test split → eval/<model>.json, every test
    query's result → eval/<model>.queries.parquet, and, when given, both to the training MLflow
    run (metrics, and the artifact `evaluation/queries.parquet` that paired comparisons read).
    A model with a re-ranker is evaluated twice: the index alone (`<split>`) and two-stage
    retrieval with `serve.rerank_k` candidates (`<reranker>/<split>`, e.g. itm/test_unseen)."""
    import pyarrow as pa

    from entityclip.evaluate import evaluate_index, summarize
    from entityclip.index import EmbeddingIndex
    from entityclip.rerank import Reranker
    from entityclip.train.checkpoint import load_model

    paths, key = RunPaths.for_config(cfg), model_key(cfg)
    index_uri = paths.index(key)
    publish.require(index_uri, "images.parquet", "index")
    index = EmbeddingIndex.load(index_uri)
    queries = evaluate_index(index, cfg.evaluate)
    model = load_model(paths.checkpoint(key))
    if model.reranker:
        reranker = Reranker(model, index, model.reranker, cfg.serve.rerank_k)
        queries |= {f"{model.reranker}/{split}": q for split, q in evaluate_index(index, cfg.evaluate, reranker).items()}
    results = {name: summarize(q, cfg.evaluate.ks) for name, q in queries.items()}
    if model.reranker:
        results |= {name: {**m, "rerank_k": reranker.k} for name, m in results.items() if "/" in name}
    table = pa.concat_tables([q.to_table(name) for name, q in queries.items()])
    storage.write_parquet(paths.query_results(key), table)
    storage.write_json(paths.evaluation(key), results)
    if run_id:
        tracker = tracker_for(cfg)
        tracker.log_metrics(run_id, {f"{split}/{k}": v for split, m in results.items() for k, v in m.items()})
        tracker.log_table(run_id, table, QUERY_RESULTS_ARTIFACT)
    return results


def stage_register(cfg: PipelineConfig, run_id: str):
    """Log the run's MLflow Model (checkpoint, and the gallery index when built) and register it
    as a new version of `<tracking.registered_model>-<variant>`; returns its ModelRef."""
    from entityclip.registry import register_run

    paths, key = RunPaths.for_config(cfg), model_key(cfg)
    checkpoint = publish.require(paths.checkpoint(key), "model.json", "train")
    index = publish.current(paths.index(key))
    has_index = storage.exists(storage.join(index, "images.faiss"))
    return register_run(tracker_for(cfg), run_id, cfg, checkpoint, index if has_index else None, paths.entities)


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


class StageTimer:
    """Runs stages and records how long each took, in seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.time()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.time() - start, 1)
        return out


def with_variant(cfg: PipelineConfig, variant: str) -> PipelineConfig:
    return replace(cfg, model=replace(cfg.model, variant=variant))


@dataclass
class TrainedVariant:
    """What `train_variant` made of one variant (and seed): its training, its evaluation (None
    when skipped) and its registered model."""
    train: object  # train.trainer.TrainResult
    metrics: dict | None
    model: object  # registry.ModelRef


def train_variant(cfg: PipelineConfig, progress: bool = True, resume: bool = False, evaluate: bool = True,
                  timer: StageTimer | None = None, tags: dict[str, str] | None = None) -> TrainedVariant:
    """Train `cfg.model.variant` with `cfg.train.seed`, index and evaluate it (unless not
    `evaluate`) and register it: what `entityclip train`, each sweep trial and each variant and
    seed of the pipeline do. `tags` go on the MLflow run; `timer` times each step."""
    run = timer.run if timer else (lambda _name, fn, *args: fn(*args))
    name = model_key(cfg)
    trained = run(f"train[{name}]", stage_train, cfg, progress, resume)
    # Which explanations it read: two runs of one config are the same experiment only if these agree.
    inputs = {EXPLANATIONS_TAG: explanations_fingerprint(RunPaths.for_config(cfg).explanations)}
    tracker_for(cfg).set_tags(trained.run_id, inputs | (tags or {}))
    metrics = None
    if evaluate:
        run(f"index[{name}]", stage_index, cfg)
        metrics = run(f"evaluate[{name}]", stage_evaluate, cfg, trained.run_id)
    model = run(f"register[{name}]", stage_register, cfg, trained.run_id)
    return TrainedVariant(trained, metrics, model)


def explanations_fingerprint(uri: str) -> str:
    """A short hash of every (sample id, explanation) pair: tells apart runs whose explanations
    differ (e.g. an LLM trained on another machine; see docs/evidence.md)."""
    import hashlib

    table = storage.read_parquet(uri).select(["sample_id", "explanation"]).sort_by("sample_id")
    digest = hashlib.sha256()
    for sample_id, explanation in zip(table["sample_id"].to_pylist(), table["explanation"].to_pylist()):
        digest.update(f"{sample_id}\x1f{explanation}\x1e".encode())
    return digest.hexdigest()[:16]


def with_seed(cfg: PipelineConfig, seed: int) -> PipelineConfig:
    return replace(cfg, train=replace(cfg.train, seed=seed))


def run_pipeline(cfg: PipelineConfig, variants: list[str], serve_query: bool = True,
                 keep_serving: bool = False, progress: bool = True, seeds: list[int] | None = None) -> dict:
    """The whole job; returns a summary (stage timings, recall per variant and seed, a served
    query). `seeds`: train each variant once per training seed (default: `train.seed` alone)."""
    from entityclip.explain.engines import KnowledgeEngine, uses_world_lm

    timer = StageTimer()
    paths = RunPaths.for_config(cfg)
    timer.run("data", stage_data, cfg, progress)
    if uses_world_lm(cfg.explain):
        timer.run("lm", stage_lm, cfg)
    explain = timer.run("explain", stage_explain, cfg, progress)
    results = {}
    for variant in variants:
        for seed in seeds or [cfg.train.seed]:
            vcfg = with_seed(with_variant(cfg, variant), seed)
            done = train_variant(vcfg, progress, timer=timer)
            results[model_key(vcfg)] = {"variant": variant, "seed": seed, "run_id": done.train.run_id,
                                        "model": done.model.uri, "checkpoint": done.train.checkpoint_uri,
                                        "metrics": done.metrics}
    summary = {"root": paths.root, "explain": explain.__dict__, "results": results, "seconds": timer.seconds}
    if serve_query:
        from ray import serve

        from entityclip.serving.app import APP_NAME

        scfg = with_seed(with_variant(cfg, variants[0]), (seeds or [cfg.train.seed])[0])
        base_url = timer.run("serve", start_serving, scfg)
        # Query for an entity held out of training: the case explanations exist for.
        unseen = [s for s in storage.read_parquet(paths.samples).to_pylist() if s["split"] == "test_unseen"]
        sample = (unseen or storage.read_parquet(paths.samples).to_pylist())[0]
        text = sample["text"]
        answer = timer.run("query", ServeClient(base_url).search_text, text, 5)
        known = KnowledgeEngine(paths.entities).find_entities(text)
        summary["query"] = {"url": f"{base_url}/search/text", "text": text, "entities": known,
                            "expected_sample": sample["sample_id"], "answer": answer}
        if not keep_serving:
            serve.delete(APP_NAME)
    storage.write_json(storage.join(paths.root, "summary.json"), summary)
    return summary
