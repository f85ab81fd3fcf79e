"""Model checkpoints: `model.safetensors` + `model.json` (model config, tokenizer, metrics).

A checkpoint is a directory (local) or prefix (s3://); `load_model` accepts either. The run
root's checkpoints are published atomically (publish.py): readers load the current version.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from entityclip import publish, storage
from entityclip.config import ModelConfig, from_dict, to_dict
from entityclip.errors import StorageError
from entityclip.models import EntityCLIP, build_model

WEIGHTS = "model.safetensors"
META = "model.json"
TOKENIZER = "open_clip.SimpleTokenizer"


def save_checkpoint(model: EntityCLIP, directory: str | Path, metrics: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    meta = {"model": to_dict(model.model_cfg), "tokenizer": TOKENIZER, "metrics": metrics or {}}
    (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def publish_checkpoint(local: str | Path, uri: str) -> None:
    """Publish the checkpoint folder `local` as the new current version of `uri` (publish.py):
    a reader loads the previous checkpoint until every file of this one is written."""
    with publish.publishing(uri) as version:
        storage.upload_dir(local, version)


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[Path]:
    """The current version of checkpoint `uri` as a local folder (a temporary copy of an S3
    one, removed on exit)."""
    uri = publish.current(uri)
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not (path / WEIGHTS).is_file():
            raise StorageError(f"{uri}: not a checkpoint (no {WEIGHTS})")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="entityclip-ckpt-") as d:
        yield storage.download_dir(uri, d)


def read_meta(uri: str) -> dict:
    return storage.read_json(storage.join(publish.current(uri), META))


def load_model(uri: str) -> EntityCLIP:
    """Build the model its checkpoint describes and load the weights (eval mode, CPU)."""
    with _local_copy(uri) as path:
        try:
            meta = json.loads((path / META).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise StorageError(f"{uri}: missing or invalid {META} ({exc})") from None
        model = build_model(from_dict(ModelConfig, meta["model"]))
        load_weights(model, path / WEIGHTS)
    return model.eval()


def load_weights(model: EntityCLIP, weights: str | Path, strict: bool = True) -> None:
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise StorageError(f"{weights}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# GeoRSCLIP's training checkpoints ({"state_dict": ...}) name its towers by these prefixes; its
# released files (RS5M_ViT-B-32.pt, ...) are already plain open_clip state dicts.
GEORSCLIP_PREFIXES = {"image_backbone.": "visual.", "text_backbone.": ""}


def georsclip_state_dict(checkpoint) -> dict | None:
    """A GeoRSCLIP training checkpoint as an open_clip CLIP state dict; None for any other file."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(k.startswith(tuple(GEORSCLIP_PREFIXES)) for k in state):
        return None
    out = {}
    for key, value in state.items():
        prefix = next((p for p in GEORSCLIP_PREFIXES if key.startswith(p)), None)
        out[GEORSCLIP_PREFIXES[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def load_pretrained(model: EntityCLIP, uri: str) -> None:
    """`model.pretrained`: one of our checkpoint folders (see `init_from`), or a CLIP checkpoint
    file for the backbone: open_clip / OpenAI format, or GeoRSCLIP's (RS5M), loaded with
    open_clip's own loader (third-party key conversion, `module.` prefixes, position-embedding
    resizing)."""
    import open_clip

    if storage.exists(storage.join(publish.current(uri), WEIGHTS)):
        init_from(model, uri)
        return
    if not storage.exists(uri):
        raise StorageError(f"{uri}: pretrained weights not found (a checkpoint file or one of our checkpoint folders)")
    with tempfile.TemporaryDirectory(prefix="entityclip-pretrained-") as d:
        local = storage.local_path(uri)
        if storage.is_s3(uri):
            local = Path(d) / uri.rsplit("/", 1)[-1]
            local.write_bytes(storage.read_bytes(uri))
        try:
            # weights_only: a checkpoint file is data; a pickle that would run code is refused.
            converted = None if local.suffix == ".safetensors" else _georsclip_file(local)
            if converted is not None:
                local = Path(d) / "georsclip-as-open_clip.pt"
                torch.save(converted, local)
            open_clip.load_checkpoint(model.clip, str(local), strict=True, weights_only=True)
        except (RuntimeError, KeyError, ValueError, AssertionError, EOFError, OSError, pickle.UnpicklingError) as exc:
            # open_clip asserts on misfit shapes; load_state_dict lists every misfit over many
            # lines, the first of which says what is wrong.
            raise StorageError(f"{uri}: not a checkpoint for backbone {model.model_cfg.backbone!r} "
                               f"({str(exc).strip().splitlines()[0][:300]})") from None


def _georsclip_file(path: Path) -> dict | None:
    """The converted state dict when `path` is a GeoRSCLIP training checkpoint; None for any
    other file (open_clip's loader then reads it, or says why it cannot)."""
    try:  # mmap: only the keys are read to recognise the format
        return georsclip_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError):
        return None


def init_from(model: EntityCLIP, uri: str) -> None:
    """Initialise from another checkpoint: one of ours, or a bare open_clip CLIP state dict in
    model.safetensors. Shared weights load; new modules (experts, gates) keep their random init,
    as in the official code. A checkpoint that fits nothing is an error, not a silent no-op."""
    with _local_copy(uri) as path:
        state = load_file(str(path / WEIGHTS))
    if not any(k.startswith("clip.") for k in state):
        state = {f"clip.{k}": v for k, v in state.items()}
    own = model.state_dict()
    misfits = [k for k, v in state.items() if k.startswith("clip.") and (k not in own or own[k].shape != v.shape)]
    if misfits:  # the backbone must match exactly, or the "initialised" model is a mix
        raise StorageError(f"{uri}: backbone weights do not fit this model ({len(misfits)} tensors, e.g. {misfits[:3]})")
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
