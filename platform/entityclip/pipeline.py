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
from entityclip.runtime import init_ray
from entityclip.serving.client import ServeClient
from entityclip.serving.deploy import start_serving
from entityclip.tracking import EXPLANATIONS_TAG, QUERY_RESULTS_ARTIFACT, tracker_for


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
        from entityclip.data.rs5m import ingest_rs5m
        from entityclip.data.samples import samples_table

        if not cfg.data.source_path:
            raise ConfigError(f"data.source={cfg.data.source} needs data.source_path (the dataset's folder)")
        if cfg.data.source == "rs5m":  # images inside tar shards: written out beside the samples
            rows, counts = ingest_rs5m(cfg.data.source_path, storage.join(paths.root, "data", "images"))
        else:
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


def stage_lm(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Train the synthetic world's LM (explain/world_lm.py) into <root>/lm, in vLLM's environment;
    returns what training measured. An LM already trained on the same world with the same
    steps and seed is kept. `progress`: a bar of its steps and loss (about 3 minutes on 2 cores)."""
    import hashlib
    import json
    import subprocess

    from tqdm import tqdm

    from entityclip.explain.engines import WORLD_LM_PROGRESS, llm_python

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
    process = subprocess.Popen([python, "-m", "entityclip.explain.world_lm", entities, paths.world_lm,
                                "--steps", str(cfg.explain.world_lm_steps), "--seed", str(cfg.data.seed)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    other = []  # what the training printed besides progress: its error, if it fails
    with tqdm(total=cfg.explain.world_lm_steps, desc="world LM", unit="step", disable=not progress) as bar:
        for line in process.stderr:
            if line.startswith(WORLD_LM_PROGRESS):
                step, _, loss = line.split()[1:]
                bar.update(int(step) - bar.n)
                bar.set_postfix(loss=loss)
            elif line.strip():
                other.append(line.strip())
    out = process.stdout.read()
    if process.wait() != 0:
        raise EntityClipError(f"training the world LM failed: {(other or ['no output'])[-1]}")
    return json.loads(out.strip().splitlines()[-1])


def stage_explain(cfg: PipelineConfig, progress: bool = True):
    from entityclip.explain.engines import run_explain_config
    from entityclip.explain.stage import run_explain

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
    from entityclip.train.trainer import TrainingPaths, run_training

    paths = RunPaths.for_config(cfg)
    require(paths.explanations, "explain")
    teacher, teacher_embeddings = cfg.train.reinforce_teacher, None
    if teacher:
        from entityclip.train.reinforce import teacher_uri, write_teacher_embeddings

        if teacher == cfg.model.variant:
            raise ConfigError(f"train.reinforce_teacher is {teacher}, the variant being trained: pick another run")
        # Written afresh each time, so a retrained teacher never leaves stale embeddings behind.
        teacher_embeddings = teacher_uri(paths.shards, teacher)
        write_teacher_embeddings(paths.index(teacher), paths.checkpoint(teacher), teacher_embeddings)
    return run_training(cfg, TrainingPaths.of(paths, teacher_embeddings), tracker_for(cfg), paths.local / "ray_results",
                        progress, resume)


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
    A model with a re-ranker, and each training-free re-ranker in `evaluate.rerankers`, adds
    two-stage retrieval with `serve.rerank_k` candidates (`<reranker>/<split>`, e.g.
    itm/test_unseen) to the index alone (`<split>`)."""
    import pyarrow as pa

    from entityclip.evaluate import evaluate_index, summarize
    from entityclip.index import EmbeddingIndex
    from entityclip.rerank import Reranker
    from entityclip.models.checkpoint import load_model

    paths, key = RunPaths.for_config(cfg), model_key(cfg)
    index_uri = paths.index(key)
    publish.require(index_uri, "images.parquet", "index")
    index = EmbeddingIndex.load(index_uri)
    queries = evaluate_index(index, cfg.evaluate)
    model = load_model(paths.checkpoint(key))
    for name in dict.fromkeys([model.reranker, *cfg.evaluate.rerankers]):
        if name:
            reranker = Reranker(model, index, name, cfg.serve.rerank_k, cfg.serve.rerank_weight,
                                cfg.serve.mack_refine_steps)
            queries |= {f"{name}/{split}": q for split, q in evaluate_index(index, cfg.evaluate, reranker).items()}
    results = {name: summarize(q, cfg.evaluate.ks) for name, q in queries.items()}
    results |= {name: {**m, "rerank_k": cfg.serve.rerank_k} for name, m in results.items() if "/" in name}
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
    from entityclip.rerank import check_runnable

    for variant in variants:  # before any work: a re-ranker a variant cannot run is a config error
        for name in cfg.evaluate.rerankers:
            check_runnable(variant, name)
    timer = StageTimer()
    paths = RunPaths.for_config(cfg)
    timer.run("data", stage_data, cfg, progress)
    if uses_world_lm(cfg.explain):
        timer.run("lm", stage_lm, cfg, progress)
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
