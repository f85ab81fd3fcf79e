"""Object-aware query perturbation (the `qperturb` variant; Sogi et al., ECCV 2024), training-free.

An image's retrieval feature is pushed toward the subspace that its object regions span: the
top `rank` principal directions U of the object patches' features (the patches whose centres
fall in the image's boxes). e' = e + alpha · U Uᵀ e: the component of e inside the object
subspace grows by (1 + alpha), every direction orthogonal to it is left exactly as it was, then
e' is renormalised. The paper perturbs the attention queries of the encoder's last layers with
the object keys' subspace; here the same projection acts on the pooled retrieval feature, which
keeps the encoder untouched and the gallery indexable. An image without boxes is not perturbed.
"""

from __future__ import annotations

import math

import torch


def patch_centres(count: int) -> torch.Tensor:
    """[count, 2] (x, y) centres of a square grid's patches, row-major like the encoder's, as
    fractions of the image side."""
    grid = math.isqrt(count)
    if grid * grid != count:
        raise ValueError(f"patch tokens must form a square grid, not {count}")
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def box_masks(boxes: torch.Tensor, count: int) -> torch.Tensor:
    """[n, count] bool, row-major like the encoder's patches: True where a patch's centre lies in
    each of the boxes [n, 4] ([x0, y0, x1, y1], fractions of the image side)."""
    x, y = patch_centres(count).to(boxes.device).unbind(dim=1)
    x0, y0, x1, y1 = (boxes[:, k:k + 1] for k in range(4))
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def box_tensor(boxes) -> torch.Tensor:
    """[n, 4] float32 from any sequence of 4-number boxes (lists, or a Ray Data batch's arrays)."""
    return torch.tensor([[float(v) for v in box] for box in boxes], dtype=torch.float32).reshape(-1, 4)


def patch_mask(boxes, grid: int) -> torch.Tensor:
    """[grid*grid] bool: True where a patch's centre lies in any of the boxes."""
    return box_masks(box_tensor(boxes), grid * grid).any(dim=0)


def object_subspace(patches: torch.Tensor, rank: int) -> torch.Tensor:
    """[r, D] orthonormal rows: the top principal directions of the object patches [n, D]
    (uncentred: the directions the features themselves point along), r = min(rank, n)."""
    _, _, vh = torch.linalg.svd(patches.float(), full_matrices=False)
    return vh[: min(rank, patches.shape[0])]


def perturb_toward_objects(embedding: torch.Tensor, patches: torch.Tensor, masks: torch.Tensor,
                           alpha: float, rank: int) -> torch.Tensor:
    """embedding [B, D], patches [B, P, D], masks [B, P] → [B, D], not renormalised (the caller
    normalises); rows whose mask is empty are returned unchanged."""
    out = embedding.clone()
    for b in range(embedding.shape[0]):
        if masks[b].any():
            u = object_subspace(patches[b][masks[b]], rank).to(embedding.dtype)
            out[b] = embedding[b] + alpha * (embedding[b] @ u.T) @ u
    return out
