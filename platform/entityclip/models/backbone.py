"""open_clip CLIP backbone built from a config (random init; nothing is downloaded), plus the
token-level encoders that MMAE needs (open_clip's encode_* return pooled features only)."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer

from entityclip.config import ModelConfig
from entityclip.errors import ConfigError


def clip_config(cfg: ModelConfig) -> dict:
    """The open_clip model config: `tiny` from our fields, or a name from open_clip's registry."""
    if cfg.backbone == "tiny":
        return {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": {"image_size": cfg.image_size, "layers": cfg.layers, "width": cfg.width,
                           "head_width": cfg.width // cfg.heads, "patch_size": cfg.patch_size},
            "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.width,
                         "heads": cfg.heads, "layers": cfg.layers},
        }
    model_cfg = open_clip.get_model_config(cfg.backbone)
    if model_cfg is None:
        raise ConfigError(f"unknown backbone {cfg.backbone!r}; use 'tiny' or one of open_clip.list_models()")
    text_cfg, vision_cfg = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg or "timm_model_name" in vision_cfg:
        # Those towers and tokenizers load from the Hugging Face hub, which we never reach.
        raise ConfigError(f"backbone {cfg.backbone!r} needs Hugging Face/timm weights; pick a plain CLIP config")
    return model_cfg


def input_sizes(cfg: ModelConfig) -> tuple[int, int]:
    """(image size, text context length) of the backbone, from its config alone."""
    model_cfg = clip_config(cfg)
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return (size[0] if isinstance(size, (tuple, list)) else size), model_cfg["text_cfg"].get("context_length", 77)


def build_clip(cfg: ModelConfig) -> open_clip.CLIP:
    model_cfg = clip_config(cfg)
    return open_clip.CLIP(
        embed_dim=model_cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**model_cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**model_cfg["text_cfg"]),
        quick_gelu=model_cfg.get("quick_gelu", False),
    )


def build_tokenizer(clip: open_clip.CLIP) -> SimpleTokenizer:
    """open_clip's BPE tokenizer: its vocabulary ships inside the package (works offline)."""
    return SimpleTokenizer(context_length=clip.context_length)


def image_size(clip: open_clip.CLIP) -> int:
    size = clip.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


def image_tokens(clip: open_clip.CLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled [B, D], tokens [B, 1 + patches, D]): every token projected into the joint space,
    token 0 being the standard CLIP image embedding."""
    return image_layers(clip, images, 1)[-1]


def image_layers(clip: open_clip.CLIP, images: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`image_tokens` read after each of the last `n` transformer layers (the last one last);
    every layer goes through the same final norm and projection."""
    visual = clip.visual
    _, layers = visual.transformer.forward_intermediates(visual._embeds(images), indices=n)
    out = []
    for x in layers:
        pooled, patches = visual._pool(x)
        if visual.proj is not None:
            pooled, patches = pooled @ visual.proj, patches @ visual.proj
        out.append((pooled, torch.cat([pooled.unsqueeze(1), patches], dim=1)))
    return out


def text_tokens(clip: open_clip.CLIP, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled [B, D] at EOT, tokens [B, L, D], padding mask [B, L] True where padding)."""
    pooled, tokens = text_layers(clip, ids, 1)[-1]
    return pooled, tokens, text_padding(ids)


def text_layers(clip: open_clip.CLIP, ids: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pooled [B, D] at EOT, tokens [B, L, D]) after each of the last `n` layers (the last one
    last), each through the final norm and the text projection."""
    x = clip.token_embedding(ids) + clip.positional_embedding
    _, layers = clip.transformer.forward_intermediates(x, attn_mask=clip.attn_mask, indices=n)
    eot = ids.argmax(dim=-1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    out = []
    for x in layers:
        x = clip.ln_final(x)
        x = x @ clip.text_projection if not isinstance(clip.text_projection, torch.nn.Linear) else clip.text_projection(x)
        out.append((x[rows, eot], x))
    return out


def text_padding(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] True at the positions after each row's EOT token (the highest id)."""
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    return positions > ids.argmax(dim=-1).unsqueeze(1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
