"""Typed run configuration: dataclasses, loaded from YAML and `section.field=value` overrides.

A pipeline run is fully described by one `PipelineConfig`; every stage reads its own section.
Every field is documented by the comments above or beside it (`field_docs` reads them;
`entityclip config` prints them); a field with a fixed set of values is a `Literal`, checked
once, when the config loads, with the allowed values in the error.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from entityclip.errors import ConfigError


# The matchers one trainer, index, evaluator and server run (models/entityclip.py).
Variant = Literal["entityclip", "entityclip_noexpl", "clip_finetune", "clip_zeroshot", "cprd", "qperturb", "filip",
                  "xattn_fusion", "adamatch", "vista", "cora"]


@dataclass
class StorageConfig:
    """Where a run keeps everything (paths.py names each artifact under it)."""

    # Root of every artifact of a run: a local path, file:// or s3://bucket/prefix URI.
    root: str = "runs/default"


@dataclass
class DataConfig:
    """The data stage: the synthetic world or a real dataset, and the training shards."""

    # synthetic (the bundled generator) or a real dataset format in its published layout
    source: Literal["synthetic", "n24news", "visualnews", "goodnews", "rs5m"] = "synthetic"
    source_path: str = ""  # the real dataset's root folder (local or s3://)
    skip_missing_images: bool = False  # real datasets: leave out samples whose image is missing
    # Real datasets: object boxes from a detector's COCO-format results (data/detections.py), for
    # the qperturb variant; boxes scoring under boxes_min_score are dropped.
    boxes_path: str = ""
    boxes_min_score: float = 0.5  # detector boxes scoring under this are dropped
    # Many entities, few samples each: with few entities a model matches by memorised names.
    num_entities: int = 96  # synthetic world: how many entities
    samples_per_entity: int = 6  # synthetic world: image-text pairs per entity
    # Fraction of entities held out of training: the "unseen" test set.
    unseen_entity_fraction: float = 0.25
    # Fraction of each seen entity's samples kept for the "seen" test set.
    seen_test_fraction: float = 0.2
    image_size: int = 64  # synthetic world: side of the generated images, in pixels
    # Synthetic world: minimal pairs of each kind in the test_compositional split (relation: the
    # same two seen entities swapped left and right; binding: which of them is drawn large), each
    # pair's texts the same words in another order. 0: no compositional split.
    compositional_pairs: int = 24
    # Synthetic world: minimal pairs of each kind added to the train split (of other entity pairs
    # than test_compositional's), so that a model can learn who is where and which is large;
    # 0: none, and nothing in training says it. With them, train.positives: pair keeps a pair's
    # two scenes (the same entities) each other's negatives.
    compositional_train_pairs: int = 0
    # Synthetic world: composed queries per entity (reference scene, "this emblem, but on
    # <setting>", target), each in another of the 4 other settings: seen entities' in
    # train_composed (what vista trains them on), unseen ones' in test_composed. 0: none.
    composed_per_entity: int = 4
    seed: int = 0  # synthetic world's generator, and the shards' row order
    # Training shards (data/shards.py): samples with their encoded image bytes, written this many
    # rows at a time (one Parquet file per split in each).
    shard_rows: int = 2048


@dataclass
class ExplainConfig:
    """The explain stage: the engine that writes each entity's explanation (explain/)."""

    # vllm: a real LLM through ray.data.llm; hf: transformers generate (the peer); knowledge:
    # reads the synthetic world's records (no LLM).
    engine: Literal["vllm", "hf", "knowledge"] = "vllm"
    # The LLM engines' model: a local Hugging Face model directory, or "world": the run's own
    # world LM (`entityclip lm` trains it on the synthetic world's knowledge into <root>/lm).
    model: str = "world"
    world_lm_steps: int = 1000  # training steps of the world LM (about 0.17 s each on 2 cores)
    num_actors: int = 1  # engine actors (Ray Data's actor pool)
    batch_size: int = 128  # rows per engine call (vLLM: per batch it schedules; 128 beat 32 by 20% on CPU)
    chunk_size: int = 256  # samples per resumable chunk written to storage
    max_tokens: int = 96  # longest explanation generated, in tokens
    num_gpus_per_actor: float = 0.0  # GPUs each engine actor reserves (0: CPU)
    # vLLM: the interpreter its engine actors run (empty: .venv-llm/bin/python, which
    # ./scripts/setup makes, where it exists; "cluster": Ray's own, e.g. a GPU image with vllm
    # installed; or a path)
    python: str = ""
    dtype: str = "bfloat16"  # vLLM: the weights' dtype
    enforce_eager: bool = True  # vLLM: no CUDA graphs / torch.compile (they cost ~40 s of start-up on CPU)
    max_model_len: int = 1024  # vLLM: longest prompt + answer, in tokens
    tensor_parallel_size: int = 1  # GPUs per vLLM engine
    # vLLM: sequences per scheduler step (0: vLLM's default for the device). On CPU 512, with
    # 16384 tokens, gave 8-9% more tokens/s than vLLM's defaults (benchmarks/explain_throughput.py).
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 16384  # vLLM: tokens per scheduler step (0: vLLM's default)
    # KV-cache block in tokens (0: vLLM's default, 128 on CPU). Prefix caching reuses whole
    # blocks only: at 32 every prompt's first block, inside the shared instruction, is computed once.
    block_size: int = 32
    # Clean-up of generations (explain/hygiene.py): longer explanations are cut at a sentence.
    max_explanation_chars: int = 400


@dataclass
class ModelConfig:
    """The matcher: its variant, backbone and the parts each variant adds (models/)."""

    # The matcher (models/entityclip.py describes each).
    variant: Variant = "entityclip"
    # open_clip model name from its registry (e.g. ViT-B-32) or "tiny" for the built-in test size.
    backbone: str = "tiny"
    # The "tiny" backbone's shape (an open_clip backbone brings its own): input side in pixels,
    # embedding and tower width, transformer layers and heads, ViT patch side, text tokens.
    image_size: int = 64
    embed_dim: int = 64  # joint embedding size
    width: int = 64  # tower width
    layers: int = 2  # transformer layers per tower
    heads: int = 2  # attention heads
    patch_size: int = 8  # ViT patch side, in pixels
    context_length: int = 77  # text tokens
    # MMAE (models/mmae.py): experts that read only the image, both modalities, only the text.
    n_vision_experts: int = 2
    n_shared_experts: int = 2  # MMAE experts shared by both modalities
    n_text_experts: int = 2  # MMAE experts for the text (and explanation)
    # qperturb: image features grow by (1 + alpha) inside the span of their object regions' top
    # `perturb_rank` feature directions (models/perturbation.py).
    perturb_alpha: float = 1.0
    perturb_rank: int = 2  # qperturb: object directions kept per image
    # xattn_fusion: token features of the last this many layers of each tower are fused.
    fusion_layers: int = 2
    # adamatch: patches of adaptive size and position per image (models/adapatch.py)
    adaptive_patches: int = 8
    graph_layers: int = 2  # cora: graph attention layers over the caption's scene graph (models/cora.py)
    graph_nodes: int = 8  # cora: scene-graph nodes kept per caption (objects first, then attributes, relations)
    # Weights to start from (models/checkpoint.py: load_pretrained), local or s3://: an open_clip or OpenAI-format
    # CLIP checkpoint file (.pt/.bin/.safetensors) for this backbone, or one of our checkpoint
    # folders. Empty = random init; nothing is ever downloaded.
    pretrained: str = ""


@dataclass
class TrainConfig:
    """Ray Train DDP training: workers, data ingest, optimisation and the losses (train/)."""

    num_workers: int = 2  # Ray Train DDP workers
    use_gpu: bool = False  # one GPU per worker, NCCL; gloo on CPU
    # Ray resources each worker reserves. Ray Data decodes the shards beside the workers and
    # needs CPUs the workers have not reserved: on 2 cores, 2 workers x 0.5 leave it one.
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 0.5})
    # Ray placement of the workers; STRICT_SPREAD puts each on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # fp32; bf16 = autocast, CPU or GPU; fp16 = autocast + grad scaler, GPU only.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    epochs: int = 60  # passes over the train split
    batch_size: int = 32  # per worker; contrastive negatives span all workers' batches
    grad_accum_steps: int = 1  # micro-batches per optimizer step (negatives stay per micro-batch)
    grad_clip_norm: float = 0.0  # clip the global gradient norm to this; 0 = off
    # Each epoch reads the blocks in a new random order, and each worker shuffles rows within a
    # buffer of this many (Ray Data local shuffle); the first batch waits for the buffer to fill.
    shuffle_buffer_rows: int = 128
    # What Ray's object store keeps after the first epoch (spilled to disk when it outgrows
    # memory): none = read and decode the shards every epoch (any size); encoded = the rows as
    # stored, decoded every epoch; decoded = model-ready tensors (fastest; about 50 KB per
    # 64 px image, 600 KB at 224 px).
    cache: Literal["none", "encoded", "decoded"] = "decoded"
    lr: float = 1e-3  # AdamW's peak learning rate (5% linear warm-up, then cosine to zero)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    plain_weight: float = 1.0  # contrastive loss on plain CLIP features
    gated_weight: float = 1.0  # contrastive loss on gated expert features (retrieval embeddings)
    itm_weight: float = 0.1  # η: matching loss of GI-ITM (or of xattn_fusion's matcher)
    explanation_weight: float = 1.0  # images vs their explanation's embedding (see train/objective.py)
    # Attribute-level alignment: image patches vs explanation words, FILIP's token-wise
    # contrastive loss between image tokens and explanation tokens (train/objective.py); 0 = off.
    explanation_token_weight: float = 0.0
    # cprd: each query's `distill_candidates` hardest in-batch negatives (by the dual encoder)
    # are ranked by the GI-ITM head; the dual encoder learns the top `distill_ranked` places of
    # that order (train/objective.py).
    distill_weight: float = 0.1
    distill_candidates: int = 6  # cprd: hard negatives ranked per query
    distill_ranked: int = 3  # cprd: places of that ranking learned
    token_weight: float = 1.0  # filip: weight of the token-wise (late interaction) contrastive loss
    composed_weight: float = 1.0  # vista: weight of the composed-query contrastive loss
    caption_weight: float = 1.0  # cora: images vs the scene-graph caption embedding (whole-caption loss)
    object_weight: float = 1.0  # cora: object nodes vs their entities' image regions (object-level loss)
    # Reinforced training (MobileCLIP): a variant of this run root, trained and indexed, whose
    # stored embeddings teach the model its image-text similarities (train/reinforce.py); "" = off.
    reinforce_teacher: str = ""
    reinforce_weight: float = 1.0  # weight of the reinforcement (teacher similarity) loss
    # Hide entity names in this share of training texts (data/pairs.py); explanation-reading
    # variants only. 0.8 over 0.5: mean unseen rsum 326 vs 286 over five seeds, seen 521 vs 532;
    # at 1.0 seen recall collapses (README, "The synthetic world's LLM").
    name_mask_prob: float = 0.8
    # Each row's positives in the contrastive batch: entities = every row showing the same set of
    # entities (what evaluate.relevance=entities counts as relevant), so that they are not pushed
    # apart as negatives; pair = its own pair only (CLIP's target). Rows without entities are
    # only their own positives either way.
    positives: Literal["entities", "pair"] = "entities"
    checkpoint_every_epochs: int = 5  # Ray Train checkpoints: resume point after a failure
    max_failures: int = 1  # worker-group failures survived by restarting from the last checkpoint
    seed: int = 0  # model init and data order; runs with other seeds are keyed <variant>-seed<N>
    log_every_steps: int = 5  # MLflow metrics every this many optimizer steps


@dataclass
class TrackingConfig:
    """MLflow: where runs are tracked and models registered."""

    # MLflow tracking URI; empty = a local sqlite store under the storage root's runs folder.
    uri: str = ""
    experiment: str = "entityclip"  # MLflow experiment the runs go in
    # Registry name prefix: each variant registers as <registered_model>-<variant>.
    registered_model: str = "entityclip"


@dataclass
class EvalConfig:
    """Recall@K and mAP@10 in both directions, per test split (evaluate.py)."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # Recall@K reported for these K
    # entities: an item is relevant when it shows the same entities (the synthetic benchmark,
    # where same-entity scenes differ only in layout); pair: the paper's 1:1 ground truth.
    relevance: Literal["entities", "pair"] = "entities"
    # test splits evaluated (one absent from the data is skipped)
    splits: list[str] = field(default_factory=lambda: ["test_seen", "test_unseen", "test_compositional",
                                                       "test_composed"])
    # Training-free re-rankers (rerank.py) evaluated besides the model's own, each logged as
    # "<reranker>/<split>" like it (their index needs image tokens: index.image_tokens).
    rerankers: list[Literal["mack", "hosa"]] = field(default_factory=list)


@dataclass
class IndexConfig:
    """The gallery index: embedding with Ray Data, searching with FAISS (index.py)."""

    num_actors: int = 1  # embedding actors (Ray Data's actor pool)
    batch_size: int = 64  # rows embedded per call
    # FAISS structure (vector_index.py): flat = exact; ivf / hnsw = approximate, for large
    # galleries; auto = flat up to auto_exact_max items, ivf above. On a clustered 1M gallery
    # (docs/scale.md) ivf with these defaults found 98.8% of the exact top 10 in 0.21 ms a
    # query; hnsw stayed below 78% at any efSearch tried.
    kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    auto_exact_max: int = 100_000  # auto: the largest gallery searched exactly (1.5 ms a query at 100k)
    ivf_nlist: int = 4096  # ivf: cells (fewer for a small gallery: ~39 points per cell)
    ivf_nprobe: int = 32  # ivf: cells searched per query
    hnsw_m: int = 32  # hnsw: links per node
    hnsw_ef_construction: int = 80  # hnsw: candidate list while building
    hnsw_ef_search: int = 64  # hnsw: candidate list while searching
    # Keep every gallery image's token features (images.tokens.npy) even for a model without a
    # re-ranker of its own, for the training-free ones (serve.rerank: mack | hosa). A model with
    # a re-ranker always keeps them.
    image_tokens: bool = False


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling of the retrieval replicas; defaults measured on 2 cores (README)."""

    # Two replicas at least: a replica that dies leaves one answering while Serve replaces it.
    min_replicas: int = 2
    max_replicas: int = 4  # the most replicas under load
    # Ongoing requests per replica that the autoscaler aims for, and the most a replica runs at
    # once (it queues the rest). A batching replica serves 16-32 concurrent clients well.
    target_ongoing_requests: float = 32.0
    max_ongoing_requests: int = 64  # requests one replica runs at once (it queues the rest)
    upscale_delay_s: float = 10.0  # load sustained this long before a replica is added
    downscale_delay_s: float = 60.0  # quiet this long before a replica is retired
    look_back_period_s: float = 10.0  # the window ongoing requests are averaged over


@dataclass
class ServeConfig:
    """The Ray Serve retrieval app (serving/): what it serves, where, and its limits."""

    # A registered model version to serve: models:/NAME@ALIAS (resolved to its version when
    # deployed) or models:/NAME/VERSION, from tracking.uri's registry. Empty: the run root's
    # checkpoint and index of model.variant.
    model: str = ""
    # With serve.model naming an alias, `entityclip serve` checks it this often and rolls the
    # app to the version it moves to (0: never).
    follow_alias_s: float = 10.0
    # Bind address. Any other than loopback needs an API key (api_key_env) or an authenticating
    # ingress in front (docs/operations.md, "Security").
    host: str = "127.0.0.1"
    port: int = 8000  # HTTP port (Serve's proxy)
    # The environment variable that holds the API key replicas require (Authorization: Bearer);
    # unset or empty: no key. The key itself never goes in a config: MLflow logs configs.
    api_key_env: str = "ENTITYCLIP_API_KEY"
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    cpus_per_replica: float = 0.5  # CPUs each retrieval replica reserves (and its torch threads)
    # Text queries waiting together are encoded as one batch (@serve.batch); no wait for a
    # batch to fill: a lone query goes at once, queries that queued meanwhile go together.
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0  # how long a batch waits to fill (0: not at all)
    # Who explains online queries for an LLM engine: auto = an `Explainer` deployment when the
    # LLM needs a GPU (explain.num_gpus_per_actor > 0), else each replica in-process;
    # deployment | in_process force one (serving/app.py).
    explainer: Literal["auto", "deployment", "in_process"] = "auto"
    explain_cache_size: int = 10_000  # explanations kept in each replica's LRU cache
    # Second stage (rerank.py): the top `rerank_k` candidates of the index re-scored by a
    # re-ranker. auto = the variant's own (filip: late_interaction, xattn_fusion:
    # xattn_fusion; none for the others); itm = EntityCLIP's GI-ITM head; none = index only;
    # mack | hosa = training-free, for any model whose index keeps image tokens.
    rerank: Literal["auto", "none", "itm", "late_interaction", "xattn_fusion", "mack", "hosa"] = "auto"
    rerank_k: int = 20  # candidates the re-ranker re-scores
    # mack | hosa: score = first-stage similarity + rerank_weight x the re-ranker's score
    rerank_weight: float = 1.0
    # mack: steps of region-level cycle-consistency fine-tuning of the word prototypes (0: none)
    mack_refine_steps: int = 0
    max_k: int = 1000  # the most results a query may ask for
    max_text_chars: int = 1000  # longest query text (and given explanation), in characters
    max_image_bytes: int = 8_000_000  # largest query image, in bytes (the body limit follows from it)
    # Checked from the image header, before decoding: a small PNG can decode to gigabytes.
    max_image_pixels: int = 16_000_000
    # Image formats queries may send (Pillow's names); no other decoder ever reads their bytes.
    image_formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP"])


@dataclass
class PipelineConfig:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def choices(typ: Any) -> tuple | None:
    """The allowed values of a `Literal` field's type; None for any other type."""
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if choices(typ) is not None:
        if value not in choices(typ):
            raise ConfigError(f"{where.removeprefix('config.')}={value!r}; choose one of {list(choices(typ))}")
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(typ, value, where)
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    if typ is str:
        return "" if value is None else str(value)
    if typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(typ)
        return {_coerce(k, key_type, f"{where}"): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if typing.get_origin(typ) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `section.field=value` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return values


def load_config(path: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults, then the YAML file at `path` (if any), then the overrides."""
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        values = loaded
    values = apply_overrides(values, overrides or [])
    return from_dict(PipelineConfig, values)


def dump_config(cfg: PipelineConfig, docs: bool = False) -> str:
    """The config as YAML; with `docs`, every field's documentation above it as comments."""
    if not docs:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return "\n".join(_documented(cfg, 0)) + "\n"


def _documented(obj: Any, depth: int) -> list[str]:
    lines, indent, docs = [], "  " * depth, field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        lines += [f"{indent}# {line}".rstrip() for line in docs.get(f.name, "").splitlines()]
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}{f.name}:", *_documented(value, depth + 1)]
        else:
            lines.append(f"{indent}{f.name}: {yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()}"
                         .removesuffix("\n...").removesuffix(" ..."))
            typ = typing.get_type_hints(type(obj))[f.name]
            allowed = choices(typ)
            if allowed:
                lines[-1] += f"  # one of: {', '.join(map(str, allowed))}"
            elif typing.get_origin(typ) is list and choices(typing.get_args(typ)[0]):
                lines[-1] += f"  # any of: {', '.join(map(str, choices(typing.get_args(typ)[0])))}"
    return lines


def field_docs(cls: type) -> dict[str, str]:
    """{field: its documentation}: the comment lines right above each field of dataclass `cls`
    and the comment after it on its line (a section's own docstring documents the section)."""
    import inspect
    import io
    import tokenize

    docs, pending, names = {}, [], {f.name for f in dataclasses.fields(cls)}
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline)
    line_tokens: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type not in (tokenize.NEWLINE, tokenize.NL):
            line_tokens.append(tok)
            continue
        significant = [t for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
        comments = [t.string.lstrip("#").strip() for t in significant if t.type == tokenize.COMMENT]
        code = [t for t in significant if t.type != tokenize.COMMENT]
        if not code and comments:
            pending += comments
        elif code and code[0].type == tokenize.NAME and code[0].string in names and len(code) > 1 and code[1].string == ":":
            docs[code[0].string] = "\n".join(pending + comments)
            pending = []
        else:
            pending = []
        line_tokens = []
    for f in dataclasses.fields(cls):  # a nested section: its class docstring
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint) and not docs.get(f.name) and hint.__doc__ and not hint.__doc__.startswith(hint.__name__ + "("):
            docs[f.name] = " ".join(hint.__doc__.split())
    return docs


def config_reference() -> str:
    """docs/configuration.md: every field of the config, its default and its documentation."""
    return ("# Configuration reference\n\n"
            "Generated from `entityclip/config.py` by `entityclip config --reference` (a test keeps it\n"
            "current). `entityclip config` prints the same with the values a config file and `--set`\n"
            "give; any field can be set in a YAML file (`--config FILE`) or on the command line\n"
            "(`--set section.field=value`). A field marked \"one of\" accepts only those values: any\n"
            "other is refused when the config loads, with the allowed values in the error.\n\n"
            "```yaml\n" + dump_config(PipelineConfig(), docs=True) + "```\n")


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train.lr": 0.001, ...}`: the form MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out

