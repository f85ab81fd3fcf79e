"""Training data as a Ray Data dataset streamed to the workers.

The train split's shards are joined with their explanations, then decoded, augmented (entity
names masked at random) and tokenized by Ray Data tasks beside the workers; each worker reads
its share with `get_dataset_shard("train").iter_torch_batches(...)`. Only a few batches are in
flight per worker, so a worker's memory does not grow with the dataset.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from entityclip import storage
from entityclip.config import ModelConfig, TrainConfig
from entityclip.data.images import decode_image, to_tensor
from entityclip.data.pairs import mask_names
from entityclip.data.shards import read_split
from entityclip.errors import InputError
from entityclip.models.backbone import input_sizes

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


def preprocess(batch: dict[str, np.ndarray], image_size: int, context_length: int, name_mask_prob: float,
               with_explanations: bool) -> dict[str, np.ndarray]:
    """Encoded rows -> model inputs: image [B,3,S,S] float32, text_ids (and explanation_ids) [B,L]."""
    images = []
    for sample_id, data in zip(batch["sample_id"], batch["image"]):
        try:
            images.append(to_tensor(decode_image(data), image_size).numpy())
        except InputError as exc:
            raise InputError(f"sample {sample_id}: {exc}") from None
    rng = np.random.default_rng()  # a fresh draw every epoch: masking is augmentation
    texts = [mask_names(t, tuple(e)) if rng.random() < name_mask_prob else t
             for t, e in zip(batch["text"], batch["entities"])]
    tokenize = _tokenizer(context_length)
    out = {"image": np.stack(images), "text_ids": tokenize(texts).numpy()}
    if with_explanations:
        out["explanation_ids"] = tokenize(list(batch["explanation"])).numpy()
    return out


def training_dataset(shards_uri: str, explanations_uri: str, model: ModelConfig, train: TrainConfig,
                     with_explanations: bool):
    """The train split as a preprocessed Ray Data dataset (lazy: it runs as workers read it)."""
    ds = read_split(shards_uri, SPLIT).select_columns(["sample_id", "image", "text", "entities"])
    if with_explanations:
        ds = ds.map_batches(attach_explanations, fn_kwargs={"explanations_uri": explanations_uri},
                            batch_format="pyarrow")
    if train.cache_encoded:
        ds = ds.materialize()
    image_size, context_length = input_sizes(model)
    # Masking only helps a model that can fall back on the explanation.
    ds = ds.map_batches(preprocess, batch_size=train.batch_size, fn_kwargs={
        "image_size": image_size, "context_length": context_length,
        "name_mask_prob": train.name_mask_prob if with_explanations else 0.0,
        "with_explanations": with_explanations})
    return ds
