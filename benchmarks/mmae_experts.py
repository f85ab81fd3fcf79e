"""MMAE experts read one output token (CLS/EOT). This compares running each expert block on
that single query token (what the model does) with the official code's full-sequence pass,
side by side in one run, and checks both give the same features.

    .venv/bin/python benchmarks/mmae_experts.py [--batch 32] [--dim 64] [--tokens 77] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from entityclip.models.mmae import MMAE


def full_sequence(mmae: MMAE, txt: torch.Tensor, pad: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """The official code's way: every expert over every token, then read the EOT position."""
    rows = torch.arange(txt.shape[0])
    return torch.stack([e(txt, txt, pad)[rows, eot] for e in mmae.text], dim=1)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mmae = MMAE(args.dim, 1, 1, args.experts)
    txt = torch.randn(args.batch, args.tokens, args.dim, requires_grad=True)
    eot = torch.randint(5, args.tokens, (args.batch,))
    pad = torch.arange(args.tokens).unsqueeze(0) > eot.unsqueeze(1)

    single = mmae.text_experts(txt, pad, eot)
    full = full_sequence(mmae, txt, pad, eot)
    max_diff = (single - full).abs().max().item()

    def step(fn):
        return lambda: fn().sum().backward()

    rows = [("full sequence (official code)", timed(step(lambda: full_sequence(mmae, txt, pad, eot)), args.repeats)),
            ("single query token (ours)", timed(step(lambda: mmae.text_experts(txt, pad, eot)), args.repeats))]
    base = rows[0][1]
    print(f"MMAE text experts, forward+backward, batch {args.batch}, {args.tokens} tokens, dim {args.dim}, "
          f"{args.experts} experts, 1 thread; max |difference| = {max_diff:.2e}")
    print(f"{'path':<32} {'ms/step':>10} {'speed-up':>10}")
    for name, ms in rows:
        print(f"{name:<32} {ms:>10.2f} {base / ms:>9.1f}x")


if __name__ == "__main__":
    main()
