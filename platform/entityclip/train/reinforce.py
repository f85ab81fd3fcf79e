"""Reinforced training (MobileCLIP, CVPR 2024): a student also learns a teacher's image-text
similarities, read from embeddings stored beside the training shards (DataCompDR style), so the
teacher never runs during training.

The teacher is any trained run of this platform: `train.reinforce_teacher` names a variant of
the same run root, whose gallery index already holds every sample's image and text embedding.
They are written once per teacher to `data/shards/teacher-<variant>.parquet` (sample_id,
image_embedding, text_embedding; the teacher's logit scale in the file's metadata) and joined
to the training rows by Ray Data, like the explanations.

Loss: for each of this worker's images, the KL divergence from the teacher's softmax over the
global batch's texts to the student's (and the same for texts over images), as MobileCLIP's
distillation term. DataCompDR stores one teacher embedding per augmented view; here the text's
name masking is the only augmentation and the teacher's embedding is of the unmasked text.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from entityclip import publish, storage
from entityclip.errors import ConfigError, InputError

SCALE_KEY = b"teacher_logit_scale"
TEACHER_COLUMNS = ("teacher_image", "teacher_text")


def teacher_uri(shards_uri: str, teacher: str) -> str:
    return storage.join(shards_uri, f"teacher-{teacher}.parquet")


def write_teacher_embeddings(index_uri: str, checkpoint_uri: str, out_uri: str) -> int:
    """Join the teacher's gallery index tables by sample_id into `out_uri` (the samples with
    both an image and a text embedding); returns the rows."""
    from entityclip.models.checkpoint import load_model

    index = publish.current(index_uri)
    if not storage.exists(storage.join(index, "images.parquet")):
        raise ConfigError(f"the reinforcement teacher has no gallery index at {index_uri}: train and index it first")
    images = storage.read_parquet(storage.join(index, "images.parquet")).select(["sample_id", "embedding"])
    texts = storage.read_parquet(storage.join(index, "texts.parquet")).select(["sample_id", "embedding"])
    text_row = {sample_id: i for i, sample_id in enumerate(texts["sample_id"].to_pylist())}
    # Samples with a text of the gallery: a composed query's target has none (index.py).
    images = images.filter(pa.array([sample_id in text_row for sample_id in images["sample_id"].to_pylist()]))
    order = pa.array([text_row[sample_id] for sample_id in images["sample_id"].to_pylist()], pa.int64())
    table = pa.table({"sample_id": images["sample_id"], "image_embedding": images["embedding"],
                      "text_embedding": texts["embedding"].take(order)})
    scale = load_model(checkpoint_uri).logit_scale.item()
    storage.write_parquet(out_uri, table.replace_schema_metadata({SCALE_KEY: str(scale).encode()}))
    return table.num_rows


def teacher_scale(uri: str) -> float:
    return float(storage.read_parquet(uri).schema.metadata[SCALE_KEY])


@functools.lru_cache(maxsize=2)
def _teacher(uri: str) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    table = storage.read_parquet(uri)
    dim = table.schema.field("image_embedding").type.list_size
    stack = lambda name: np.asarray(table[name].combine_chunks().flatten(), np.float32).reshape(-1, dim)  # noqa: E731
    return {s: i for i, s in enumerate(table["sample_id"].to_pylist())}, stack("image_embedding"), stack("text_embedding")


def attach_teacher(batch: pa.Table, teacher_uri: str) -> pa.Table:
    """Adds teacher_image / teacher_text columns (fixed-size float32 lists) to training rows."""
    rows, images, texts = _teacher(teacher_uri)
    ids = batch["sample_id"].to_pylist()
    missing = [i for i in ids if i not in rows]
    if missing:
        raise InputError(f"sample {missing[0]} has no teacher embedding in {teacher_uri}; rebuild the teacher's index")
    order = np.array([rows[i] for i in ids], dtype=np.int64)
    column = lambda x: pa.FixedSizeListArray.from_arrays(pa.array(x[order].reshape(-1)), x.shape[1])  # noqa: E731
    return batch.append_column("teacher_image", column(images)).append_column("teacher_text", column(texts))


def similarity_distillation_loss(student_img: torch.Tensor, student_txt: torch.Tensor, all_student_img: torch.Tensor,
                                 all_student_txt: torch.Tensor, teacher_img: torch.Tensor, teacher_txt: torch.Tensor,
                                 all_teacher_img: torch.Tensor, all_teacher_txt: torch.Tensor,
                                 scale: torch.Tensor, teacher_scale: float) -> torch.Tensor:
    """KL(teacher ‖ student) of each row's softmax over the global batch, both directions,
    averaged. Rows: this worker's; columns: every worker's (the `all_` tensors)."""
    def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1),
                        log_target=True, reduction="batchmean")

    image_to_text = kl(scale * student_img @ all_student_txt.T, teacher_scale * teacher_img @ all_teacher_txt.T)
    text_to_image = kl(scale * student_txt @ all_student_img.T, teacher_scale * teacher_txt @ all_teacher_img.T)
    return (image_to_text + text_to_image) / 2
