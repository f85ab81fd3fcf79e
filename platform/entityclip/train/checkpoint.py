"""Model checkpoints: `model.safetensors` + `model.json` (model config, tokenizer, metrics).

A checkpoint is a directory (local) or prefix (s3://); `load_model` accepts either.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from entityclip import storage
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
    meta = {"model": to_dict(model.cfg), "tokenizer": TOKENIZER, "metrics": metrics or {}}
    (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def _local_copy(uri: str) -> Path:
    if storage.is_s3(uri):
        return storage.download_dir(uri, tempfile.mkdtemp(prefix="entityclip-ckpt-"))
    path = storage.local_path(uri)
    if not (path / WEIGHTS).is_file():
        raise StorageError(f"{uri}: not a checkpoint (no {WEIGHTS})")
    return path


def read_meta(uri: str) -> dict:
    return storage.read_json(storage.join(uri, META))


def load_model(uri: str) -> EntityCLIP:
    """Build the model its checkpoint describes and load the weights (eval mode, CPU)."""
    path = _local_copy(uri)
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


def load_pretrained(model: EntityCLIP, uri: str) -> None:
    """`model.pretrained`: one of our checkpoint folders (see `init_from`), or an open_clip /
    OpenAI-format CLIP checkpoint file for the backbone, loaded with open_clip's own loader
    (third-party key conversion, `module.` prefixes, position-embedding resizing)."""
    import open_clip

    if storage.exists(storage.join(uri, WEIGHTS)):
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
            open_clip.load_checkpoint(model.clip, str(local), strict=True)
        except (RuntimeError, KeyError, ValueError, AssertionError, EOFError, OSError) as exc:
            # open_clip asserts on misfit shapes; load_state_dict lists every misfit over many
            # lines, the first of which says what is wrong.
            raise StorageError(f"{uri}: not a checkpoint for backbone {model.cfg.backbone!r} "
                               f"({str(exc).strip().splitlines()[0][:300]})") from None


def init_from(model: EntityCLIP, uri: str) -> None:
    """Initialise from another checkpoint: one of ours, or a bare open_clip CLIP state dict in
    model.safetensors. Shared weights load; new modules (experts, gates) keep their random init,
    as in the official code. A checkpoint that fits nothing is an error, not a silent no-op."""
    state = load_file(str(_local_copy(uri) / WEIGHTS))
    if not any(k.startswith("clip.") for k in state):
        state = {f"clip.{k}": v for k, v in state.items()}
    own = model.state_dict()
    misfits = [k for k, v in state.items() if k.startswith("clip.") and (k not in own or own[k].shape != v.shape)]
    if misfits:  # the backbone must match exactly, or the "initialised" model is a mix
        raise StorageError(f"{uri}: backbone weights do not fit this model ({len(misfits)} tensors, e.g. {misfits[:3]})")
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
