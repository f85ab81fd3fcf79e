"""HOSA (LREC-COLING 2024: "High-Order Semantic Alignment for Unsupervised Fine-Grained
Image-Text Retrieval"), training-free: an image matches a text when its salient regions can be
rebuilt from the text's words.

Regions and words already share one space here (the backbone's patch and word tokens, both
projected into the joint embedding space); the paper learns that space with transformer layers
over Faster R-CNN regions and BERT words. Each region r_j is taken to be a linear combination of
the sentence's words W [l, D]: its coefficients h_j solve the ridge problem
    min ||r_j - W^T h_j||^2 + ridge ||h_j||^2,   i.e. (W W^T + ridge I) h_j = W r_j,
and the coefficient tensor H [l, m] over all m regions is the reconstruction. The paper obtains H
[l, m, D] with the t-product, whose coefficients are tubes along the feature axis; with tubes
constant along that axis the t-product is this matrix product, and the solve is the same one
(free tubes make the problem underdetermined per Fourier slice, so any text rebuilds any region).
The local similarity of region j is cos(r_j, W^T h_j); the pair's score aggregates them (mean).
Salient regions: the `regions` patches closest to the image's pooled feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REGIONS = 8  # salient patches per image
RIDGE = 0.1  # keeps the solve well-posed when words are few or nearly collinear


def salient_regions(tokens: torch.Tensor, regions: int = REGIONS) -> torch.Tensor:
    """tokens [B, 1 + P, D] (token 0 the pooled feature) → [B, m, D] the m patches most similar
    to it, m = min(regions, P)."""
    pooled, patches = F.normalize(tokens[:, :1].float(), dim=-1), F.normalize(tokens[:, 1:].float(), dim=-1)
    top = (patches @ pooled.transpose(1, 2)).squeeze(-1).topk(min(regions, patches.shape[1]), dim=1).indices
    return torch.gather(patches, 1, top.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))


def reconstruction(regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                   ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """regions [B, m, D], words [B, l, D], word_mask [B, l] True for a word → (coefficients H
    [B, l, m], local similarities [B, m]): each region's cosine with its rebuilt self."""
    r = F.normalize(regions.float(), dim=-1)
    w = F.normalize(words.float(), dim=-1) * word_mask.unsqueeze(-1)  # a masked word adds nothing
    gram = w @ w.transpose(1, 2) + ridge * torch.eye(w.shape[1])
    coefficients = torch.linalg.solve(gram, w @ r.transpose(1, 2))
    rebuilt = coefficients.transpose(1, 2) @ w
    return coefficients, F.cosine_similarity(rebuilt, r, dim=-1, eps=1e-8)


def word_mask(padding: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """[B, L] True at a text's words: not padding, not the start or end-of-text token."""
    mask = ~padding.clone()
    mask[:, 0] = False
    mask[torch.arange(len(mask)), eot_index] = False
    return mask


def pair_scores(image_tokens: torch.Tensor, text_tokens: torch.Tensor, padding: torch.Tensor,
                eot_index: torch.Tensor) -> torch.Tensor:
    """[B] HOSA scores of aligned pairs: the mean local similarity of the image's salient regions."""
    _, local = reconstruction(salient_regions(image_tokens), text_tokens, word_mask(padding, eot_index))
    return local.mean(dim=1)
