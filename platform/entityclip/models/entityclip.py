"""EntityCLIP and its baselines as one module described by a variant's `VariantSpec`, so every
variant runs through the same trainer, evaluator, index and server; a new variant is one entry
of `VARIANT_SPECS` (and its name in config.Variant).

Variants:
- `entityclip`: MMAE experts + GI-ITM; text features are enriched with explanation tokens.
- `entityclip_noexpl`: the same architecture, but the shared experts attend to the text itself
  (ablation: no external knowledge).
- `clip_finetune`: plain CLIP features, contrastive loss only.
- `clip_zeroshot`: plain CLIP features, never trained.
- `cprd`: EntityCLIP whose dual-encoder similarities also learn the GI-ITM cross-encoder's
  ranking of each query's hardest negatives (contrastive partial ranking distillation, CVPR
  2024; train/objective.py).
- `qperturb`: EntityCLIP trained as usual; at inference an image's feature is perturbed toward
  its object regions' subspace (Object-Aware Query Perturbation, ECCV 2024; models/perturbation.py).
- `filip`: plain CLIP features for the first stage, plus FILIP's token-wise late interaction
  (ICLR 2022; models/late_interaction.py) trained with its own contrastive loss and used to
  re-rank the first stage's top candidates.
- `xattn_fusion`: plain CLIP features for the first stage, plus a cross-modal attention matcher
  over features fused from several layers (arXiv 2406.15306; models/xattn_fusion.py) trained
  with a matching loss and used to re-rank.
- `adamatch`: filip's token-wise matching with the image tokens replaced by AdaMatch's patches of
  adaptive size and position (ACL 2024; models/adapatch.py), each with its box, so the match of
  each word to a region can be shown (Retriever.word_regions).
- `vista`: plain CLIP features, and a composed-query encoder after VISTA (ACL 2024): the text
  tower reads the image tower's tokens, projected to its width, before the words, so a query
  can be an image plus a text saying what changes ("this emblem, but on a sandy beach").
  Trained on train_composed's triplets besides the plain pairs. VISTA also embeds candidate
  images through the text encoder; here candidates keep the image tower's embedding, so the
  gallery index is any dual encoder's and only the query side is new.
- `cora`: plain CLIP image features; the caption's scene graph (objects, attributes, relations,
  parsed by rules: data/scene_graph.py) embedded by a graph attention network over the text
  tower's tokens, its object nodes added to the caption's EOT embedding (CORA, CVPR 2024;
  models/cora.py), trained with a whole-caption and an object-level contrastive loss. CORA pools
  the image with GPO; here the image keeps CLIP's pooled token.

Composed queries. Every variant embeds one (`composed_embedding`): vista with its encoder, the
others as the sum of their image and text embeddings (the late-fusion baseline of composed
image retrieval).

Re-rankers. Each trainable variant but clip_finetune, vista and cora has one second stage that scores an
(image, text) pair from token features (`reranker`): the GI-ITM head (`itm`) for the
EntityCLIP architecture, `late_interaction` for filip and adamatch, `xattn_fusion` for xattn_fusion.
Retrieval (rerank.py) re-scores the single-vector search's top candidates with it.

Retrieval embeddings. The paper scores with plain CLIP features at inference; here the gated
features are the retrieval embeddings, so the explanation of a query still helps when matching
entities never seen in training (docs/design.md §4). The image side uses no explanation, which keeps
the gallery indexable independently of any query.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields

import torch
from torch import nn

from entityclip.config import ModelConfig, Variant
from entityclip.errors import ConfigError
from entityclip.models import backbone
from entityclip.models.adapatch import AdaPatch
from entityclip.models.cora import SceneGraphEncoder, SceneGraphs, object_mean, scene_graph_arrays
from entityclip.models.late_interaction import pair_similarities
from entityclip.models.mmae import MMAE, Gate
from entityclip.models.perturbation import patch_mask, perturb_toward_objects
from entityclip.models.xattn_fusion import CrossAttentionMatcher, LayerFusion

@dataclass(frozen=True)
class VariantSpec:
    """What a variant is made of; the model, the objective and the re-ranker read only this."""
    experts: bool  # MMAE experts and gates give the retrieval embeddings, with a GI-ITM head
    explanations: bool  # the text side reads each text's explanation
    reranker: str | None = None  # its second stage: itm | late_interaction | xattn_fusion
    losses: tuple[str, ...] = ()  # extra training losses: distill (cprd), token (filip)
    fused_tokens: bool = False  # token features fused over the last layers (xattn_fusion)
    perturb: bool = False  # image embeddings perturbed toward object regions at inference (qperturb)
    adaptive_patches: bool = False  # image tokens are AdaPatch's adaptive patches (adamatch)
    composed: bool = False  # the text tower reads image tokens before the words (vista)
    scene_graph: bool = False  # the caption's scene graph through a graph attention network (cora)
    trainable: bool = True


# One entry per variant (config.Variant names them; a test keeps the two equal).
VARIANT_SPECS: dict[str, VariantSpec] = {
    "entityclip": VariantSpec(experts=True, explanations=True, reranker="itm"),
    "entityclip_noexpl": VariantSpec(experts=True, explanations=False, reranker="itm"),
    "clip_finetune": VariantSpec(experts=False, explanations=False),
    "clip_zeroshot": VariantSpec(experts=False, explanations=False, trainable=False),
    "cprd": VariantSpec(experts=True, explanations=True, reranker="itm", losses=("distill",)),
    "qperturb": VariantSpec(experts=True, explanations=True, reranker="itm", perturb=True),
    "filip": VariantSpec(experts=False, explanations=False, reranker="late_interaction", losses=("token",)),
    "xattn_fusion": VariantSpec(experts=False, explanations=False, reranker="xattn_fusion", fused_tokens=True),
    "adamatch": VariantSpec(experts=False, explanations=False, reranker="late_interaction", losses=("token",),
                            adaptive_patches=True),
    "vista": VariantSpec(experts=False, explanations=False, losses=("composed",), composed=True),
    "cora": VariantSpec(experts=False, explanations=False, losses=("caption", "objects"), scene_graph=True),
}
VARIANTS = typing.get_args(Variant)


@dataclass
class ImageFeatures:
    cls: torch.Tensor  # [B, D] plain CLIP image embedding
    # [B, T, D] (xattn_fusion: fused over layers); token 0 is `cls` otherwise, then the patches
    # (adamatch: its adaptive patches)
    tokens: torch.Tensor
    regions: torch.Tensor | None = None  # adamatch: [B, K, 4] each adaptive patch's box

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor) -> "ImageFeatures":
        """Features rebuilt from stored tokens (a gallery index), token 0 standing for `cls`."""
        return cls(tokens[:, 0], tokens)

    def select(self, index: torch.Tensor) -> "ImageFeatures":
        values = (getattr(self, f.name) for f in fields(self))
        return ImageFeatures(*(None if v is None else v[index] for v in values))


@dataclass
class TextFeatures:
    eot: torch.Tensor  # [B, D] plain CLIP text embedding
    tokens: torch.Tensor  # [B, L, D]
    padding: torch.Tensor  # [B, L]
    eot_index: torch.Tensor  # [B]
    expl_eot: torch.Tensor  # [B, D] the explanation's own embedding (the text's for the ablation)
    expl_tokens: torch.Tensor  # [B, L, D] explanation tokens (the text's own for the ablation)
    expl_padding: torch.Tensor  # [B, L]
    ids: torch.Tensor  # [B, L] the text's token ids (training-free re-rankers read its words)
    graphs: SceneGraphs | None = None  # cora: each text's scene graph
    nodes: torch.Tensor | None = None  # cora: [B, N, D] its nodes after the graph attention layers

    def select(self, index: torch.Tensor) -> "TextFeatures":
        values = (getattr(self, f.name) for f in fields(self))
        return TextFeatures(*(None if v is None else v.select(index) if isinstance(v, SceneGraphs) else v[index]
                              for v in values))


class EntityCLIP(nn.Module):
    def __init__(self, model_cfg: ModelConfig):
        super().__init__()
        self.model_cfg, self.spec = model_cfg, VARIANT_SPECS[model_cfg.variant]
        self.clip = backbone.build_clip(model_cfg)
        self.tokenizer = backbone.build_tokenizer(self.clip)
        self.image_size = backbone.image_size(self.clip)
        self.uses_experts, self.uses_explanations = self.spec.experts, self.spec.explanations
        dim = backbone.embed_dim(self.clip)
        if self.uses_experts:
            nv, ns, nt = model_cfg.n_vision_experts, model_cfg.n_shared_experts, model_cfg.n_text_experts
            self.mmae = MMAE(dim, nv, ns, nt)
            self.image_gate = Gate(dim, 1 + nv)
            self.text_gate = Gate(dim, 2 + nt + ns)
            self.pair_gate = Gate(2 * dim, nv + ns + nt + ns)
            self.itm_head = nn.Linear(dim, 2)  # class 1 = match
        if self.spec.fused_tokens:
            depth = backbone.layer_count(self.clip)
            if not 1 <= model_cfg.fusion_layers <= depth:
                raise ConfigError(f"model.fusion_layers is {model_cfg.fusion_layers}; this backbone gives {depth} "
                                  "layers' token features per tower")
            self.image_fusion, self.text_fusion = LayerFusion(model_cfg.fusion_layers), LayerFusion(model_cfg.fusion_layers)
        if self.spec.reranker == "xattn_fusion":
            self.matcher = CrossAttentionMatcher(dim)
        if self.spec.adaptive_patches:
            self.adapatch = AdaPatch(dim, model_cfg.adaptive_patches)
        if self.spec.scene_graph:
            self.graph_encoder = SceneGraphEncoder(dim, model_cfg.graph_layers)
        if self.spec.composed:  # image tokens into the text tower's width, with their own positions
            width = backbone.text_width(self.clip)
            self.image_prefix = nn.Linear(dim, width)
            self.prefix_position = nn.Parameter(0.01 * torch.randn(backbone.image_token_count(self.clip), width))

    @property
    def trainable(self) -> bool:
        return self.spec.trainable

    @property
    def reranker(self) -> str | None:
        """The second stage this model scores (image, text) pairs with, if any."""
        return self.spec.reranker

    @property
    def has_match_head(self) -> bool:
        return self.reranker in ("itm", "xattn_fusion")

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_images(self, images: torch.Tensor) -> ImageFeatures:
        if self.spec.fused_tokens:
            layers = backbone.image_layers(self.clip, images, self.model_cfg.fusion_layers)
            return ImageFeatures(layers[-1][0], self.image_fusion([tokens for _, tokens in layers]))
        cls, tokens = backbone.image_tokens(self.clip, images)
        if self.spec.adaptive_patches:
            patches, boxes = self.adapatch(tokens[:, 1:])
            return ImageFeatures(cls, torch.cat([cls.unsqueeze(1), patches], dim=1), boxes)
        return ImageFeatures(cls, tokens)

    def encode_texts(self, ids: torch.Tensor, expl_ids: torch.Tensor | None = None,
                     graphs: SceneGraphs | None = None) -> TextFeatures:
        if self.spec.fused_tokens:
            layers = backbone.text_layers(self.clip, ids, self.model_cfg.fusion_layers)
            eot, tokens = layers[-1][0], self.text_fusion([t for _, t in layers])
            padding = backbone.text_padding(ids)
        else:
            eot, tokens, padding = backbone.text_tokens(self.clip, ids)
        if self.uses_explanations:
            if expl_ids is None:
                raise ValueError("the entityclip variant needs explanation token ids")
            expl_eot, expl_tokens, expl_padding = backbone.text_tokens(self.clip, expl_ids)
        else:
            expl_eot, expl_tokens, expl_padding = eot, tokens, padding
        nodes = None
        if self.spec.scene_graph:
            if graphs is None:
                raise ValueError("the cora variant needs each text's scene graph (models/cora.py: scene_graph_arrays)")
            nodes = self.graph_encoder(tokens, graphs)
        return TextFeatures(eot, tokens, padding, ids.argmax(dim=-1), expl_eot, expl_tokens, expl_padding, ids,
                            graphs, nodes)

    def image_embedding(self, img: ImageFeatures, boxes: list | None = None) -> torch.Tensor:
        """Unit-norm retrieval embedding: gated over [CLS, vision experts] or plain CLS. The
        qperturb variant perturbs it toward the object regions in `boxes` (one list per image)."""
        if not self.uses_experts:
            return backbone.normalize(img.cls)
        candidates = torch.cat([img.cls.unsqueeze(1), self.mmae.vision_experts(img.tokens)], dim=1)
        embedding = self.image_gate(img.cls, candidates)
        if self.spec.perturb and boxes is not None:
            patches = img.tokens[:, 1:]
            grid = round(patches.shape[1] ** 0.5)
            masks = torch.stack([patch_mask(b, grid) for b in boxes]).to(patches.device)
            embedding = perturb_toward_objects(embedding, patches, masks, self.model_cfg.perturb_alpha, self.model_cfg.perturb_rank)
        return backbone.normalize(embedding)

    def text_embedding(self, txt: TextFeatures) -> torch.Tensor:
        """Unit-norm retrieval embedding: gated over [EOT, explanation EOT, text experts,
        explanation experts]; cora's: EOT plus the mean of its scene graph's object nodes."""
        if self.spec.scene_graph:
            return backbone.normalize(txt.eot + object_mean(txt.nodes, txt.graphs.objects))
        if not self.uses_experts:
            return backbone.normalize(txt.eot)
        candidates = torch.cat([
            txt.eot.unsqueeze(1),
            txt.expl_eot.unsqueeze(1),
            self.mmae.text_experts(txt.tokens, txt.padding, txt.eot_index),
            self.mmae.shared_experts(txt.tokens, txt.eot_index, txt.expl_tokens, txt.expl_padding),
        ], dim=1)
        return backbone.normalize(self.text_gate(txt.eot, candidates))

    def composed_embedding(self, img: ImageFeatures, txt: TextFeatures) -> torch.Tensor:
        """Unit-norm embedding of a composed query (a reference image and a text saying what
        changes), searched against the gallery's image embeddings: vista's text tower over the
        image tokens then the words; for every other variant, the normalized sum of its image
        and text embeddings."""
        if not self.spec.composed:
            return backbone.normalize(self.image_embedding(img) + self.text_embedding(txt))
        prefix = self.image_prefix(img.tokens) + self.prefix_position
        return backbone.normalize(backbone.prefixed_text_embedding(self.clip, prefix, txt.ids))

    def match_logits(self, img: ImageFeatures, txt: TextFeatures) -> torch.Tensor:
        """[B, 2] match logits (class 1 = match) of aligned pairs from the variant's matching
        head: GI-ITM, or xattn_fusion's cross-modal attention matcher."""
        if self.spec.reranker == "xattn_fusion":
            return self.matcher(img.tokens, txt.tokens, txt.padding, txt.eot_index)
        if not self.uses_experts:
            raise ValueError(f"variant {self.model_cfg.variant} has no matching head")
        return self.itm_logits(img, txt)

    def pair_scores(self, img: ImageFeatures, txt: TextFeatures, text_query: bool) -> torch.Tensor:
        """[B] the re-ranker's score of aligned pairs, for ranking images against a text query
        (`text_query`) or texts against an image query: late interaction's similarity for that
        direction, or the matching head's logit margin."""
        if self.spec.reranker == "late_interaction":
            image_to_text, text_to_image = pair_similarities(img.tokens, txt.tokens, txt.padding)
            return text_to_image if text_query else image_to_text
        logits = self.match_logits(img, txt)
        return logits[:, 1] - logits[:, 0]

    def itm_logits(self, img: ImageFeatures, txt: TextFeatures) -> torch.Tensor:
        """GI-ITM: [B, 2] match logits for aligned (image, text+explanation) pairs."""
        if not self.uses_experts:
            raise ValueError(f"variant {self.model_cfg.variant} has no GI-ITM head")
        experts = torch.cat([
            self.mmae.vision_experts(img.tokens),
            self.mmae.shared_experts(img.tokens, None, txt.expl_tokens, txt.expl_padding),
            self.mmae.text_experts(txt.tokens, txt.padding, txt.eot_index),
            self.mmae.shared_experts(txt.tokens, txt.eot_index, txt.expl_tokens, txt.expl_padding),
        ], dim=1)
        fused = self.pair_gate(torch.cat([img.cls, txt.eot], dim=-1), experts)
        return self.itm_head(fused)

    # Convenience entry points for inference (evaluation, index, serving).
    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, boxes: list | None = None) -> torch.Tensor:
        return self.image_embedding(self.encode_images(images), boxes)

    @torch.no_grad()
    def text_features(self, texts: list[str], explanations: list[str] | None = None) -> TextFeatures:
        expl_ids = self.tokenize(explanations) if self.uses_explanations else None
        ids = self.tokenize(texts)
        graphs = SceneGraphs.from_arrays(scene_graph_arrays(self.tokenizer, list(texts), ids, self.model_cfg.graph_nodes),
                                         ids.device) if self.spec.scene_graph else None
        return self.encode_texts(ids, expl_ids, graphs)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], explanations: list[str] | None = None) -> torch.Tensor:
        return self.text_embedding(self.text_features(texts, explanations))

    @torch.no_grad()
    def embed_composed(self, images: torch.Tensor, texts: list[str], explanations: list[str] | None = None) -> torch.Tensor:
        return self.composed_embedding(self.encode_images(images), self.text_features(texts, explanations))

    @torch.no_grad()
    def match_probability(self, images: torch.Tensor, texts: list[str], explanations: list[str]) -> torch.Tensor:
        """P(match) from the matching head for aligned pairs; NaN for variants without one."""
        if not self.has_match_head:
            return torch.full((len(texts),), float("nan"))
        logits = self.match_logits(self.encode_images(images), self.text_features(texts, explanations))
        return logits.softmax(dim=-1)[:, 1]


def build_model(model_cfg: ModelConfig) -> EntityCLIP:
    return EntityCLIP(model_cfg)
