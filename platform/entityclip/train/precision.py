"""`train.precision`: the autocast context and gradient scaler of each setting, in one place for
the Ray Train loop, the overhead and precision benchmarks (no Ray import: runs anywhere torch does).

fp32 runs without autocast; bf16 autocasts on CPU or GPU; fp16 autocasts on GPU with a grad
scaler, whose loss scaling keeps small fp16 gradients from flushing to zero.
"""

from __future__ import annotations

import contextlib
import typing

import torch

from entityclip.config import TrainConfig

PRECISIONS = typing.get_args(typing.get_type_hints(TrainConfig)["precision"])


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A scaler that is a pass-through except under fp16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
