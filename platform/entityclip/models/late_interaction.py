"""FILIP's token-wise late interaction (Yao et al., ICLR 2022).

Every image token is compared with every (non-padding) text token by cosine similarity. The
image-to-text similarity of a pair is the mean over image tokens of each one's best text token;
the text-to-image similarity is the mean over text tokens of each one's best image token. The two
are not equal, and FILIP's token-wise contrastive loss uses each for its own direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reduce(sim: torch.Tensor, txt_padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sim [..., P, L] token cosines, txt_padding [..., L] → (image→text, text→image) [...]."""
    pad = txt_padding.unsqueeze(-2)
    image_to_text = sim.masked_fill(pad, float("-inf")).amax(dim=-1).mean(dim=-1)
    valid = (~txt_padding).to(sim.dtype)
    text_to_image = (sim.amax(dim=-2) * valid).sum(dim=-1) / valid.sum(dim=-1)
    return image_to_text, text_to_image


def token_similarities(img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_padding: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image→text [I, T], text→image [I, T]) late-interaction similarities of every image with
    every text. img_tokens [I, P, D], txt_tokens [T, L, D], txt_padding [T, L] True at padding."""
    img, txt = F.normalize(img_tokens.float(), dim=-1), F.normalize(txt_tokens.float(), dim=-1)
    sim = torch.einsum("ipd,tld->itpl", img, txt)
    return _reduce(sim, txt_padding.to(sim.device).unsqueeze(0))


def pair_similarities(img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_padding: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image→text [B], text→image [B]) for aligned pairs: row b's image with row b's text."""
    img, txt = F.normalize(img_tokens.float(), dim=-1), F.normalize(txt_tokens.float(), dim=-1)
    return _reduce(torch.einsum("bpd,bld->bpl", img, txt), txt_padding.to(img.device))
