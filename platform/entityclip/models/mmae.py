"""Multimodal Attentive Experts (MMAE) and the gate that aggregates them (GI-ITM).

Follows the official EntityCLIP code (docs/entityclip-paper.md §1.2): every expert is a
single-head pre-LN transformer block whose queries come from one modality and keys/values from
itself (vision/text experts) or from the explanation tokens (shared experts, whose weights
serve both the image and the text branch).
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertBlock(nn.Module):
    """x = x + MHA(LN(x), LN(y), LN(y)); x = x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int = 1):
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_padding: torch.Tensor | None = None) -> torch.Tensor:
        kv = self.ln_kv(y)
        x = x + self.attn(self.ln_q(x), kv, kv, key_padding_mask=y_padding, need_weights=False)[0]
        return x + self.mlp(self.ln_mlp(x))


def _pick(tokens: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Token `index[b]` of each row as a [B, 1, D] query (token 0 when index is None)."""
    if index is None:
        return tokens[:, :1]
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), index].unsqueeze(1)


class MMAE(nn.Module):
    """Each expert is read at one token (CLS or EOT). Keys/values come from the unchanged input,
    so running the block on that single query token gives exactly the output the official code
    reads from a full-sequence pass, at a fraction of the cost."""

    def __init__(self, dim: int, n_vision: int, n_shared: int, n_text: int):
        super().__init__()
        self.vision = nn.ModuleList(ExpertBlock(dim) for _ in range(n_vision))
        self.shared = nn.ModuleList(ExpertBlock(dim) for _ in range(n_shared))
        self.text = nn.ModuleList(ExpertBlock(dim) for _ in range(n_text))

    @staticmethod
    def _run(experts: nn.ModuleList, query: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([e(query, kv, kv_pad) for e in experts], dim=1)

    def vision_experts(self, img_tok: torch.Tensor) -> torch.Tensor:
        """[B, n_vision, D]: token 0 attending over the image tokens."""
        return self._run(self.vision, _pick(img_tok, None), img_tok, None)

    def text_experts(self, txt_tok: torch.Tensor, txt_pad: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """[B, n_text, D]: the EOT token attending over the text tokens."""
        return self._run(self.text, _pick(txt_tok, eot), txt_tok, txt_pad)

    def shared_experts(self, query_tok: torch.Tensor, index: torch.Tensor | None,
                       expl_tok: torch.Tensor, expl_pad: torch.Tensor) -> torch.Tensor:
        """[B, n_shared, D]: the image CLS or text EOT token attending over the explanation."""
        return self._run(self.shared, _pick(query_tok, index), expl_tok, expl_pad)


class Gate(nn.Module):
    """softmax(Linear(condition)) weights over a stack of candidate features: [B, n, D] → [B, D]."""

    def __init__(self, condition_dim: int, n_candidates: int):
        super().__init__()
        self.proj = nn.Linear(condition_dim, n_candidates)

    def forward(self, condition: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        weights = self.proj(condition).softmax(dim=-1)
        return (weights.unsqueeze(-1) * candidates).sum(dim=1)
