"""open_clip CLIP backbone built from a config (random init; nothing is downloaded), plus the
token-level encoders that MMAE needs (open_clip's encode_* return pooled features only).

Image towers are open_clip ViTs or timm models (e.g. MobileCLIP's FastViT MCi, built without
pretrained weights); text towers are open_clip text transformers, causal (CLIP) or not
(MobileCLIP). Towers and tokenizers that only the Hugging Face hub provides are refused.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from entityclip.config import ModelConfig
from entityclip.errors import ConfigError


def clip_config(model_cfg: ModelConfig) -> dict:
    """The open_clip model config: `tiny` from our fields, or a name from open_clip's registry."""
    if model_cfg.backbone == "tiny":
        return {
            "embed_dim": model_cfg.embed_dim,
            "vision_cfg": {"image_size": model_cfg.image_size, "layers": model_cfg.layers, "width": model_cfg.width,
                           "head_width": model_cfg.width // model_cfg.heads, "patch_size": model_cfg.patch_size},
            "text_cfg": {"context_length": model_cfg.context_length, "vocab_size": 49408, "width": model_cfg.width,
                         "heads": model_cfg.heads, "layers": model_cfg.layers},
        }
    model_cfg = open_clip.get_model_config(model_cfg.backbone)
    if model_cfg is None:
        raise ConfigError(f"unknown backbone {model_cfg.backbone!r}; use 'tiny' or one of open_clip.list_models()")
    text_cfg, vision_cfg = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        # Those towers and tokenizers load from the Hugging Face hub, which we never reach.
        raise ConfigError(f"backbone {model_cfg.backbone!r} needs a Hugging Face text model; pick one with an "
                          "open_clip text tower (a CLIP ViT, MobileCLIP, ...)")
    if "timm_model_name" in vision_cfg:  # timm builds the architecture; weights come from model.pretrained
        model_cfg = {**model_cfg, "vision_cfg": {**vision_cfg, "timm_model_pretrained": False}}
    return model_cfg


def input_sizes(model_cfg: ModelConfig) -> tuple[int, int]:
    """(image size, text context length) of the backbone, from its config alone."""
    model_cfg = clip_config(model_cfg)
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return (size[0] if isinstance(size, (tuple, list)) else size), model_cfg["text_cfg"].get("context_length", 77)


def build_clip(model_cfg: ModelConfig) -> open_clip.CLIP | open_clip.CustomTextCLIP:
    model_cfg = clip_config(model_cfg)
    model_class = open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP
    return model_class(
        embed_dim=model_cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**model_cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**model_cfg["text_cfg"]),
        quick_gelu=model_cfg.get("quick_gelu", False),
    )


def text_tower(clip: nn.Module) -> nn.Module:
    """The module holding the text transformer: CustomTextCLIP's `.text`, or CLIP itself."""
    return getattr(clip, "text", clip)


def embed_dim(clip: nn.Module) -> int:
    projection = text_tower(clip).text_projection
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[-1]


def layer_count(clip: nn.Module) -> int:
    """How many layers' token features both towers can give (`image_layers`, `text_layers`): a
    timm image tower gives its final features only."""
    vision = 1 if isinstance(clip.visual, TimmModel) else len(clip.visual.transformer.resblocks)
    return min(vision, len(text_tower(clip).transformer.resblocks))


def build_tokenizer(clip: open_clip.CLIP) -> SimpleTokenizer:
    """open_clip's BPE tokenizer: its vocabulary ships inside the package (works offline)."""
    return SimpleTokenizer(context_length=clip.context_length)


def word_positions(tokenizer, ids: torch.Tensor, eot: int) -> list[tuple[str, list[int]]]:
    """The words of one tokenized text with the positions of their BPE pieces, between the start
    token and end-of-text `eot` (open_clip's BPE marks a word's last piece with "</w>")."""
    words, pieces, positions = [], [], []
    for position in range(1, eot):
        piece = tokenizer.decoder[int(ids[position])]
        pieces.append(piece.removesuffix("</w>"))
        positions.append(position)
        if piece.endswith("</w>"):
            words.append(("".join(pieces), positions))
            pieces, positions = [], []
    if pieces:
        words.append(("".join(pieces), positions))
    return words


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
    if isinstance(visual, TimmModel):
        return [_timm_tokens(visual, images, n)]
    _, layers = visual.transformer.forward_intermediates(visual._embeds(images), indices=n)
    out = []
    for x in layers:
        pooled, patches = visual._pool(x)
        if visual.proj is not None:
            pooled, patches = pooled @ visual.proj, patches @ visual.proj
        out.append((pooled, torch.cat([pooled.unsqueeze(1), patches], dim=1)))
    return out


def _timm_tokens(visual: TimmModel, images: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm tower whose classifier is average pooling then a linear layer (MobileCLIP's MCi):
    the linear layer applied at every position of the final feature map gives tokens whose mean
    is exactly the pooled embedding."""
    head = getattr(visual.trunk, "head", None)
    if n != 1 or getattr(head, "global_pool", None) is None or not isinstance(getattr(head, "fc", None), nn.Linear) \
            or head.global_pool.pool_type != "avg":
        raise ConfigError("token features of this timm image tower are not supported: it needs an average-pool + "
                          "linear classifier head, and gives its final layer only (model.fusion_layers: 1)")
    features = visual.trunk.forward_features(images)  # [B, C, H, W]
    pooled = visual.head(visual.trunk.forward_head(features))
    patches = visual.head(head.fc(features.flatten(2).transpose(1, 2)))
    return pooled, torch.cat([pooled.unsqueeze(1), patches], dim=1)


def text_tokens(clip: open_clip.CLIP, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled [B, D] at EOT, tokens [B, L, D], padding mask [B, L] True where padding)."""
    pooled, tokens = text_layers(clip, ids, 1)[-1]
    return pooled, tokens, text_padding(ids)


def text_layers(clip: open_clip.CLIP, ids: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pooled [B, D] at EOT, tokens [B, L, D]) after each of the last `n` layers (the last one
    last), each through the final norm and the text projection."""
    text = text_tower(clip)
    x = text.token_embedding(ids) + text.positional_embedding
    _, layers = text.transformer.forward_intermediates(x, attn_mask=text.attn_mask, indices=n)
    eot = ids.argmax(dim=-1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    out = []
    for x in layers:
        x = text.ln_final(x)
        x = text.text_projection(x) if isinstance(text.text_projection, nn.Linear) else x @ text.text_projection
        out.append((x[rows, eot], x))
    return out


def text_width(clip: nn.Module) -> int:
    return text_tower(clip).transformer.width


def image_token_count(clip: nn.Module) -> int:
    """How many tokens `image_tokens` gives per image (the pooled one and the patches): ViT towers only."""
    if isinstance(clip.visual, TimmModel):
        raise ConfigError("this variant reads the image tower's patch tokens in fixed positions: it needs a ViT image "
                          "tower, not a timm one")
    return 1 + clip.visual.grid_size[0] * clip.visual.grid_size[1]


def prefixed_text_embedding(clip: nn.Module, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The text tower's pooled output [B, D] at EOT over `prefix` [B, P, width] (inputs already
    in the tower's width, their positions added by the caller) followed by the words of `ids`.
    Every word reads the whole prefix and, in a causal tower, the words before it; the prefix
    reads only itself, as a prefix language model's does."""
    text = text_tower(clip)
    p, length = prefix.shape[1], ids.shape[1]
    x = torch.cat([prefix, text.token_embedding(ids) + text.positional_embedding[:length]], dim=1)
    mask = torch.zeros(p + length, p + length, dtype=x.dtype, device=x.device)
    mask[:p, p:] = float("-inf")
    if text.attn_mask is not None:  # causal among the words
        mask[p:, p:] = text.attn_mask[:length, :length]
    x = text.ln_final(text.transformer(x, attn_mask=mask))
    pooled = x[torch.arange(ids.shape[0], device=ids.device), p + ids.argmax(dim=-1)]
    return pooled @ text.text_projection if not isinstance(text.text_projection, nn.Linear) else text.text_projection(pooled)


def text_padding(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] True at the positions after each row's EOT token (the highest id)."""
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    return positions > ids.argmax(dim=-1).unsqueeze(1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
