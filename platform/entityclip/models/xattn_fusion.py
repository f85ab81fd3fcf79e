"""The cross-modal attention matcher of "Advanced Multimodal Deep Learning Architecture for
Image-Text Matching" (arXiv 2406.15306), at this platform's scale.

Hierarchical fusion: each tower's token features after its last `model.fusion_layers` layers
(every layer through the tower's own final norm and projection) are mixed with learned softmax
weights, so shallow, local features and deep, global ones both reach the matcher. Cross-modal
attention: image tokens attend to the text's tokens and text tokens to the image's, one
pre-LN block each way; the image's token 0 and the text's EOT token, so updated, are joined and
a small MLP gives match / no-match logits. It scores one (image, text) pair at a time, so it
re-ranks the dual encoder's top candidates rather than searching a gallery.
"""

from __future__ import annotations

import torch
from torch import nn

from entityclip.models.mmae import ExpertBlock


class LayerFusion(nn.Module):
    """Softmax-weighted sum of per-layer token features: n × [B, T, D] → [B, T, D]. Starts as
    the plain mean of the layers."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_layers))

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        weights = self.logits.softmax(dim=0)
        return sum(w * x for w, x in zip(weights, layers))


class CrossAttentionMatcher(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.image_reads_text = ExpertBlock(dim)
        self.text_reads_image = ExpertBlock(dim)
        self.head = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 2))

    def forward(self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_padding: torch.Tensor,
                eot_index: torch.Tensor) -> torch.Tensor:
        """[B, 2] match logits (class 1 = match) for aligned pairs."""
        image = self.image_reads_text(img_tokens[:, :1], txt_tokens, txt_padding)[:, 0]
        rows = torch.arange(txt_tokens.shape[0], device=txt_tokens.device)
        # Only the EOT output is read, and a block's output at a query depends on that query
        # alone, so the EOT token is the only query the block needs.
        text = self.text_reads_image(txt_tokens[rows, eot_index].unsqueeze(1), img_tokens)[:, 0]
        return self.head(torch.cat([image, text], dim=-1))
