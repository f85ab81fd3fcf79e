"""AdaPatch, the image side of AdaMatch (ACL 2024: "Fine-Grained Image-Text Alignment in Medical
Imaging Enables Explainable Cyclic Image-Report Generation"): patches of adaptive size and
position, each matched to the text's words, so a match is explained region by region.

A fixed grid cuts an object wherever the grid lies; lesions (here, emblems) vary in size and
place. Each of K learned queries attends over the backbone's patch tokens; the attention map's
mean is the adaptive patch's centre and its spread (standard deviation along x and y) its size.
The patch's feature pools the tokens under a Gaussian window of that centre and size, so both
are learned through the feature they give, and every patch has a box: centre ± sqrt(3 var +
(half a patch)^2) along each axis, which is exactly the extent of a uniform block of patches
(a block of n patches of side s has variance s^2 (n^2 - 1) / 12 over its patch centres). Our reading of the paper: it predicts each patch's position and
size with a small network over a feature map and crops; the window keeps that differentiable.

Words and adaptive patches are matched token-wise (models/late_interaction.py): the adamatch
variant trains them with FILIP's token-wise contrastive loss and re-ranks with the late
interaction; AdaMatch-Cyclic's report generation is not part of retrieval.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from entityclip.models.perturbation import patch_centres

class AdaPatch(nn.Module):
    def __init__(self, dim: int, patches: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(patches, dim) * dim ** -0.5)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """patch tokens [B, N, D] of an image's square grid → (adaptive patch features [B, K, D],
        their boxes [B, K, 4] as x0, y0, x1, y1 fractions of the image side)."""
        coords = patch_centres(tokens.shape[1]).to(tokens.device, torch.float32)  # [N, 2]
        logits = torch.einsum("kd,bnd->bkn", self.queries, self.norm(tokens)) / math.sqrt(tokens.shape[-1])
        attention = logits.float().softmax(dim=-1)
        centre = attention @ coords  # [B, K, 2]
        half_patch = 0.5 / math.isqrt(tokens.shape[1])
        variance = (attention @ coords.square() - centre.square()).clamp_min(0)
        spread = variance.clamp_min(half_patch ** 2).sqrt()  # a window on one token is still a window
        offsets = (coords[None, None] - centre[:, :, None]) / spread[:, :, None]  # [B, K, N, 2]
        window = (-0.5 * offsets.square().sum(dim=-1)).softmax(dim=-1)  # Gaussian, normalised
        features = torch.einsum("bkn,bnd->bkd", window.to(tokens.dtype), tokens)
        half_extent = (3 * variance + half_patch ** 2).sqrt()
        boxes = torch.cat([centre - half_extent, centre + half_extent], dim=-1).clamp(0, 1)
        return features, boxes


def word_matches(patches: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each word feature [L, D], its best adaptive patch [K, D]: (patch index [L], cosine [L])."""
    sim = F.normalize(words.float(), dim=-1) @ F.normalize(patches.float(), dim=-1).T
    best = sim.max(dim=1)
    return best.indices, best.values
