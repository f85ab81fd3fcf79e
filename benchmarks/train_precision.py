"""Training-step speed and numerics of each `train.precision` on one device, side by side:
the product's model and objective (train/objective.py) under the product's autocast and grad
scaler (train/precision.py), AdamW, on the same fixed batches from the same initial weights.

fp32 is the peer. For each precision: samples/s over the timed steps (after warm-up steps),
the speed-up over fp32, peak device memory (CUDA only), the loss after the last
step, and the largest gap between its per-step loss and fp32's over the run (the precision
changes the arithmetic, not what is learned). fp16 runs on CUDA only, as in training.

Batches are random images and short random texts: speed and numerics need no real data, and
this runs without Ray, on any machine with torch and open_clip (a GPU box included).

    .venv/bin/python benchmarks/train_precision.py [--config configs/default.yaml]
        [--set model.backbone=ViT-B-32] [--batch 64] [--steps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from entityclip.config import load_config
from entityclip.models import build_model
from entityclip.models.backbone import input_sizes
from entityclip.train.objective import Objective
from entityclip.train.precision import PRECISIONS, autocast, grad_scaler

WORDS = "rovers lift cup city council opens bridge storm hits coast singer wins award team signs striker".split()


def batches(cfg, model, batch: int, count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """(images, text ids, explanation ids, entity groups or None) per step; with
    train.positives=entities, rows fall in groups of about four, as same-entity rows would."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    size, _ = input_sizes(cfg.model)

    def texts() -> torch.Tensor:
        return model.tokenize([" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(batch)])

    def groups() -> torch.Tensor | None:
        return torch.randint(0, max(1, batch // 4), (batch,), generator=gen) if cfg.train.positives == "entities" else None

    return [(torch.randn(batch, 3, size, size, generator=gen), texts(), texts(), groups()) for _ in range(count)]


def run(cfg, precision: str, device: torch.device, data, warmup: int) -> dict:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    objective = Objective(model, cfg.train).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.train.lr)
    scaler = grad_scaler(precision, device)
    losses, timed, start = [], 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step, (images, ids, expl_ids, groups) in enumerate(data):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        images, ids, expl_ids = images.to(device), ids.to(device), expl_ids.to(device)
        groups = groups.to(device) if groups is not None else None
        with autocast(precision, device):
            loss = objective(images, ids, expl_ids if model.uses_explanations else None, groups=groups)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises: every step is counted whole
        timed += step >= warmup
    seconds = time.perf_counter() - start
    # A CPU process's peak RSS only grows, so it would not tell the precisions apart.
    memory_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"precision": precision, "samples_per_s": timed * len(data[0][0]) / seconds,
            "peak_memory_mb": memory_mb, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    device = torch.device(args.device)
    model = build_model(cfg.model)
    data = batches(cfg, model, args.batch, args.warmup + args.steps, cfg.train.seed)
    precisions = [p for p in PRECISIONS if p != "fp16" or device.type == "cuda"]
    rows = [run(cfg, p, device, data, args.warmup) for p in precisions]
    base = rows[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{cfg.model.variant} on {cfg.model.backbone} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"batch {args.batch}, {args.steps} timed steps after {args.warmup}, {name}")
    print("| precision | samples/s | vs fp32 | peak memory MB | final loss | max loss gap vs fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        r["max_loss_gap"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        print(f"| {r['precision']} | {r['samples_per_s']:.1f} | {r['speedup']:.2f}x | {'-' if r['peak_memory_mb'] is None else round(r['peak_memory_mb'])} | "
              f"{r['losses'][-1]:.4f} | {r['max_loss_gap']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "backbone": cfg.model.backbone, "batch": args.batch,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
