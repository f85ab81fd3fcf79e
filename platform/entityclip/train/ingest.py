"""Training data as a Ray Data dataset streamed to the workers.

The train split's shards are joined with their explanations, then decoded and tokenized (the
text both as written and with its entity names masked) by Ray Data tasks beside the workers;
`train.cache` says which stage Ray's object store keeps between epochs. Each worker reads its
share with `get_dataset_shard("train").iter_torch_batches(collate_fn=MaskNames(p))`, which
picks the masked text for a fresh random share p of the rows every epoch (the augmentation).
Only a few batches are in flight per worker, so its memory does not grow with the dataset.
A composed-query variant (vista) also reads train_composed, whose rows carry the reference
image they modify; a scene-graph variant (cora) gets each text's scene graph, with the boxes
of the entities it names.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import torch

from entityclip import storage
from entityclip.config import ModelConfig, TrainConfig
from entityclip.data.images import decode_image, to_tensor
from entityclip.data.pairs import mask_names
from entityclip.data.samples import TRAIN_COMPOSED_SPLIT, stable_id
from entityclip.data.shards import read_split
from entityclip.errors import InputError
from entityclip.models.backbone import input_sizes
from entityclip.models.cora import scene_graph_arrays
from entityclip.models.entityclip import VariantSpec
from entityclip.train.reinforce import TEACHER_COLUMNS, attach_teacher

SPLIT = "train"


@functools.lru_cache(maxsize=2)
def _explanations(uri: str) -> dict[str, str]:
    """sample_id -> explanation, read once per Ray worker process (text only, small beside images)."""
    table = storage.read_parquet(uri).select(["sample_id", "explanation"])
    return dict(zip(table["sample_id"].to_pylist(), table["explanation"].to_pylist()))


def attach_explanations(batch: pa.Table, explanations_uri: str) -> pa.Table:
    known = _explanations(explanations_uri)
    ids = batch["sample_id"].to_pylist()
    missing = [i for i in ids if i not in known]
    if missing:
        raise InputError(f"sample {missing[0]} has no explanation in {explanations_uri}; rerun `entityclip explain`")
    return batch.append_column("explanation", pa.array([known[i] for i in ids], pa.string()))


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def entity_group(sample_id: str, entities) -> int:
    """A row's positives group (train.positives=entities): a stable 63-bit hash of its entity set,
    or of its sample id when it names no entity (it is then its own group)."""
    return stable_id("\x1f".join(sorted(entities)) if len(entities) else "\x1e" + sample_id)


def _pixels(sample_id: str, data: bytes, image_size: int) -> np.ndarray:
    try:
        return to_tensor(decode_image(data), image_size).numpy()
    except InputError as exc:
        raise InputError(f"sample {sample_id}: {exc}") from None


def preprocess(batch: dict[str, np.ndarray], image_size: int, context_length: int, masking: bool,
               with_explanations: bool, groups: bool = False, scene_graph_nodes: int = 0) -> dict[str, np.ndarray]:
    """Encoded rows -> model inputs: image [B,3,S,S] float32; text_ids, masked_text_ids (with
    `masking`) and explanation_ids (with `with_explanations`), each [B,L] int64; with `groups`,
    each row's entity group [B] int64; teacher embeddings, where the rows carry them, as [B,D]
    float32; where they carry reference images, `reference` [B,3,S,S] (zeros in plain rows)
    and `composed` [B] bool; with `scene_graph_nodes`, the texts' scene graphs of that many
    nodes (`graph_*`, models/cora.py)."""
    images = np.stack([_pixels(i, data, image_size) for i, data in zip(batch["sample_id"], batch["image"])])
    tokenize = _tokenizer(context_length)
    out = {"image": images, "text_ids": tokenize(list(batch["text"])).numpy()}
    if "reference_image" in batch:
        out["composed"] = np.array([data is not None for data in batch["reference_image"]])
        out["reference"] = np.stack([np.zeros_like(images[0]) if data is None else _pixels(i, data, image_size)
                                     for i, data in zip(batch["sample_id"], batch["reference_image"])])
    if scene_graph_nodes:
        boxes = [[list(box) for box in row] for row in batch["boxes"]]
        out |= scene_graph_arrays(tokenize, list(batch["text"]), out["text_ids"], scene_graph_nodes,
                                  [list(e) for e in batch["entities"]], boxes)
    if masking:
        out["masked_text_ids"] = tokenize([mask_names(t, tuple(e)) for t, e in zip(batch["text"], batch["entities"])]).numpy()
    if with_explanations:
        out["explanation_ids"] = tokenize(list(batch["explanation"])).numpy()
    if groups:
        out["group"] = np.array([entity_group(i, e) for i, e in zip(batch["sample_id"], batch["entities"])],
                                dtype=np.int64)
    for name in TEACHER_COLUMNS:
        if name in batch:
            out[name] = np.stack(batch[name]).astype(np.float32)
    return out


class MaskNames:
    """Worker-side collate: numpy batch -> tensors, each row's text masked with probability p."""

    def __init__(self, name_mask_prob: float, seed: int | None = None):
        self.p = name_mask_prob
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        masked = batch.pop("masked_text_ids", None)
        if masked is not None and self.p:
            chosen = self.rng.random(len(masked)) < self.p
            batch["text_ids"] = np.where(chosen[:, None], masked, batch["text_ids"])
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def training_dataset(shards_uri: str, explanations_uri: str, model: ModelConfig, train: TrainConfig,
                     spec: VariantSpec, teacher_uri: str | None = None):
    """The train split as `spec`'s variant reads it, as a model-ready Ray Data dataset, its
    blocks in a new random order each epoch, drawn from `train.seed` (lazy: it runs as workers
    read it, from the cache on). With `teacher_uri`, each row also carries its teacher
    embeddings (train/reinforce.py); for a composed-query variant, train_composed's rows follow,
    with their reference images."""
    with_explanations = spec.explanations
    columns = ["sample_id", "image", "text", "entities"] + (["reference_image"] if spec.composed else []) \
        + (["boxes"] if spec.scene_graph else [])
    ds = read_split(shards_uri, SPLIT).select_columns(columns)
    if spec.composed:
        ds = ds.union(read_split(shards_uri, TRAIN_COMPOSED_SPLIT).select_columns(columns))
    if with_explanations:
        ds = ds.map_batches(attach_explanations, fn_kwargs={"explanations_uri": explanations_uri},
                            batch_format="pyarrow")
    if teacher_uri:
        ds = ds.map_batches(attach_teacher, fn_kwargs={"teacher_uri": teacher_uri}, batch_format="pyarrow")
    if train.cache == "encoded":
        ds = ds.materialize()
    image_size, context_length = input_sizes(model)
    # Blocks of one batch each, so that the random block order shuffles well.
    ds = ds.map_batches(preprocess, batch_size=train.batch_size, fn_kwargs={
        "image_size": image_size, "context_length": context_length,
        # Masking only helps a model that can fall back on the explanation.
        "masking": with_explanations and train.name_mask_prob > 0, "with_explanations": with_explanations,
        "groups": train.positives == "entities", "scene_graph_nodes": model.graph_nodes if spec.scene_graph else 0})
    if train.cache == "decoded":
        ds = ds.materialize()
    from ray.data import RandomSeedConfig

    return ds.randomize_block_order(seed=RandomSeedConfig(seed=train.seed, reseed_after_execution=True))
