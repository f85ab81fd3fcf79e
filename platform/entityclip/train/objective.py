"""The training objective as an nn.Module, so DDP wraps one forward that returns the loss.

loss = plain_weight · L_VTC(CLS, EOT) + gated_weight · L_VTC(V*, T*) + itm_weight · L_ITM
       + explanation_weight · L_VTC(V*, E) + explanation_token_weight · L_token(patches, E words)

The paper uses 1 · L_VTC(CLS) + 0.1 · L_VTC(V*, T*) + 0.1 · L_ITM and scores with CLS at
inference. We retrieve with the gated features, so they carry full weight by default. L_VTC(V*, E)
contrasts images with their explanation's own embedding E: the paper starts from a pretrained
CLIP whose text tower already knows what "a red circle" looks like; a backbone trained from
scratch must learn it, or it matches by memorised names and cannot reach unseen entities.
L_token(patches, E words), off by default, is the same at the level of attributes: FILIP's
token-wise contrastive loss between an image's patch tokens and its explanation's word tokens
("orange", "diamond", "dots"), so that patches learn the words that describe them.

The cprd variant adds contrastive partial ranking distillation (Chen et al., CVPR 2024):
for each text, its `distill_candidates` hardest negative images in the worker's batch by the
dual encoder (and for each image, its hardest negative texts) are scored by the GI-ITM
cross-encoder, the teacher (no gradient flows into it from this term); the dual encoder's
similarities over those negatives then learn the teacher's order of its top `distill_ranked`
places, Plackett-Luce style: the negative the teacher ranks r-th should win a softmax against
every negative it ranks below. Only negatives are ranked: the positive's place is the
contrastive loss's job, so the two objectives never pull against each other, and places below
`distill_ranked` are not ordered among themselves (partial ranking).

The filip variant adds FILIP's token-wise contrastive loss (the same InfoNCE over its
late-interaction similarities, each direction with its own), and xattn_fusion adds the matching
loss of its cross-modal attention matcher (hard negatives as for GI-ITM). Both keep the plain
contrastive loss, since their first stage searches with the plain features.

The vista variant adds a composed-query loss: on train_composed's rows (a reference image, a
text saying what changes, the target image) the same InfoNCE between the composed query's
embedding and the target's image embedding, the batch's other composed rows being the
negatives. Its plain contrastive loss covers the plain pairs only: a composed row's text ("this
emblem, but on a sandy beach.") does not describe its image alone.

The cora variant adds CORA's two losses: the whole-caption one, images against the caption's
scene-graph embedding (its retrieval embedding), and the object-level one, each object node of
the graph against the image region of the entity it names (models/cora.py).

With `train.reinforce_teacher`, any variant also learns a trained teacher's similarities over
the global batch from stored embeddings (MobileCLIP's reinforced training, train/reinforce.py).

With `train.positives: entities` (the default), rows showing the same entities are each other's
positives: the contrastive target spreads evenly over them, and ITM and CPRD never mine them as
negatives. Scenes of the same entities differ only in layout, and evaluation counts them as
relevant; as CLIP's negatives they would teach the model to tell apart what it must match.

Negatives span the global batch: each worker gathers every worker's features with gradients
and scores its own rows against all of them (open_clip's gather_with_grad + local_loss). With
DDP averaging the gradients, N workers of batch b learn exactly what one process of batch N·b
does. ITM hard negatives are mined within the worker's own batch, as in ALBEF.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from entityclip.config import TrainConfig
from entityclip.models.cora import SceneGraphs, object_region_loss
from entityclip.models.entityclip import EntityCLIP
from entityclip.models.late_interaction import token_similarities
from entityclip.train.reinforce import similarity_distillation_loss


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every worker's rows of `x` concatenated in rank order, offset of this worker's rows);
    gradients flow back to each worker's own rows. `x` itself outside distributed training."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(dist_fn.all_gather(x)), dist.get_rank() * x.shape[0]


def positive_targets(groups: torch.Tensor | None, n: int, offset: int, device,
                     columns: torch.Tensor | None = None) -> torch.Tensor:
    """Targets over the global batch for this worker's rows: without `groups`, row i's positive
    is its own pair (column offset + i); with them, every column of the row's group shares the
    probability evenly (rows showing the same entities are not each other's negatives), among
    the `columns` ([N] bool) that take part, where given."""
    if groups is None:
        return torch.arange(n, device=device) + offset
    same = (groups[:, None] == gather_with_grad(groups)[0][None, :]).float()
    if columns is not None:
        same = same * columns.float()
    return same / same.sum(dim=1, keepdim=True).clamp(min=1)


def symmetric_cross_entropy(image_to_text: torch.Tensor, text_to_image: torch.Tensor, offset: int,
                            groups: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE both ways over [b, N] logit matrices whose row i is this worker's pair i and whose
    columns are the global batch; positives as `positive_targets` says. With `rows` ([b] bool),
    only the batch's rows where it holds take part, as queries and as candidates (a worker
    with none of them adds a zero loss)."""
    if rows is None:
        target = positive_targets(groups, image_to_text.shape[0], offset, image_to_text.device)
        return (F.cross_entropy(image_to_text, target) + F.cross_entropy(text_to_image, target)) / 2
    inside = gather_with_grad(rows.float())[0] > 0.5
    target = positive_targets(groups, image_to_text.shape[0], offset, image_to_text.device, inside)
    # A large negative logit, not -inf: soft targets are 0 there, and 0 x -inf is NaN.
    per_row = sum(F.cross_entropy(logits.masked_fill(~inside, -1e4), target, reduction="none")
                  for logits in (image_to_text, text_to_image))
    return (per_row * rows).sum() / (2 * rows.sum().clamp(min=1))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                     groups: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over unit-norm features, this worker's pairs against the global batch
    (with `rows`, its rows where that [b] mask holds, against the global batch's)."""
    img, txt = img.float(), txt.float()  # the softmax over the batch wants fp32 under autocast
    all_img, offset = gather_with_grad(img)
    all_txt, _ = gather_with_grad(txt)
    return symmetric_cross_entropy(scale * img @ all_txt.T, scale * txt @ all_img.T, offset, groups, rows)


def token_contrastive_loss(img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_padding: torch.Tensor,
                           scale: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """FILIP's token-wise InfoNCE: image→text logits from the image-to-text late interaction,
    text→image from the text-to-image one, over the global batch."""
    all_img, offset = gather_with_grad(img_tokens)
    all_txt, _ = gather_with_grad(txt_tokens)
    all_padding = gather_with_grad(txt_padding.float())[0] > 0.5
    image_to_text, _ = token_similarities(img_tokens, all_txt, all_padding)  # [b, N]
    _, text_to_image = token_similarities(all_img, txt_tokens, txt_padding)  # [N, b]
    return symmetric_cross_entropy(scale * image_to_text, scale * text_to_image.T, offset, groups)


def positives(n: int, groups: torch.Tensor | None, device) -> torch.Tensor:
    """[n, n] boolean: which rows of a worker's batch are each row's positives (its own pair, and
    with `groups` the rows of its group)."""
    if groups is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return groups[:, None] == groups[None, :]


@torch.no_grad()
def sample_hard_negatives(similarity: torch.Tensor, groups: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF-style: for each image a negative text, for each text a negative image, drawn with
    probability softmax(similarity) over its negatives (a row whose batch holds only positives
    gets another positive: a rare false negative for the matching loss)."""
    negative = ~positives(similarity.shape[0], groups, similarity.device)
    off_diag = ~torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    allowed = torch.where(negative.any(dim=1, keepdim=True), negative, off_diag)

    def draw(sim: torch.Tensor) -> torch.Tensor:
        return torch.multinomial((sim.softmax(dim=1) + 1e-5) * allowed, 1).squeeze(1)

    return draw(similarity), draw(similarity.T)


def partial_ranking_loss(student: torch.Tensor, teacher: torch.Tensor, ranked: int) -> torch.Tensor:
    """Mean Plackett-Luce negative log-likelihood of the teacher's order of each row's candidates
    under the student's scores, over the first `ranked` places. student, teacher: [N, k]."""
    order = teacher.argsort(dim=1, descending=True)
    in_teacher_order = student.gather(1, order)
    # logsumexp of the scores at places r..k, for every r
    rest = torch.logcumsumexp(in_teacher_order.flip(1), dim=1).flip(1)
    return (rest - in_teacher_order)[:, :ranked].mean()


def hardest_negatives(similarity: torch.Tensor, k: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """[N, k] column indices of each row's k most similar columns, its positives excluded (they
    rank last, should a row have fewer than k negatives); k is capped at N - 1."""
    n = similarity.shape[0]
    masked = similarity.masked_fill(positives(n, groups, similarity.device), float("-inf"))
    return masked.topk(min(k, n - 1), dim=1).indices


class Objective(nn.Module):
    def __init__(self, model: EntityCLIP, train_cfg: TrainConfig, teacher_scale: float | None = None):
        super().__init__()
        self.model = model
        self.train_cfg = train_cfg
        self.teacher_scale = teacher_scale  # reinforced training: the teacher's logit scale

    def forward(self, images: torch.Tensor, ids: torch.Tensor, expl_ids: torch.Tensor | None,
                teacher_image: torch.Tensor | None = None, teacher_text: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, references: torch.Tensor | None = None,
                composed: torch.Tensor | None = None, graphs: SceneGraphs | None = None) -> dict[str, torch.Tensor]:
        """`groups`: [b] int64, rows of equal value are each other's positives (train.positives);
        None: each row's positive is its own pair. `composed` ([b] bool) marks composed-query
        rows, whose `references` [b, 3, S, S] hold their reference images (vista). `graphs`: the
        texts' scene graphs (cora)."""
        m = self.model
        img, txt = m.encode_images(images), m.encode_texts(ids, expl_ids, graphs)
        scale = m.logit_scale
        cls_img, cls_txt = F.normalize(img.cls, dim=-1), F.normalize(txt.eot, dim=-1)
        plain_rows = None if composed is None else ~composed
        out = {"loss_plain": contrastive_loss(cls_img, cls_txt, scale, groups, plain_rows)}
        loss = self.train_cfg.plain_weight * out["loss_plain"]
        if "caption" in m.spec.losses:
            out["loss_caption"] = contrastive_loss(cls_img, m.text_embedding(txt), scale, groups)
            loss = loss + self.train_cfg.caption_weight * out["loss_caption"]
        if "objects" in m.spec.losses:
            out["loss_objects"] = object_region_loss(txt.nodes, graphs, img.tokens[:, 1:], scale)
            loss = loss + self.train_cfg.object_weight * out["loss_objects"]
        if "composed" in m.spec.losses and composed is not None:
            query = m.composed_embedding(m.encode_images(references), txt)
            out["loss_composed"] = contrastive_loss(cls_img, query, scale, rows=composed)
            loss = loss + self.train_cfg.composed_weight * out["loss_composed"]
        if m.uses_experts:
            image_emb, text_emb = m.image_embedding(img), m.text_embedding(txt)
            out["loss_gated"] = contrastive_loss(image_emb, text_emb, scale, groups)
            loss = loss + self.train_cfg.gated_weight * out["loss_gated"]
            if m.uses_explanations and self.train_cfg.explanation_weight:
                out["loss_explanation"] = contrastive_loss(image_emb, F.normalize(txt.expl_eot, dim=-1), scale,
                                                           groups)
                loss = loss + self.train_cfg.explanation_weight * out["loss_explanation"]
            if m.uses_explanations and self.train_cfg.explanation_token_weight:
                out["loss_explanation_tokens"] = token_contrastive_loss(img.tokens, txt.expl_tokens, txt.expl_padding,
                                                                        scale, groups)
                loss = loss + self.train_cfg.explanation_token_weight * out["loss_explanation_tokens"]
        if m.has_match_head and images.shape[0] > 1:  # GI-ITM, or xattn_fusion's matcher
            out["loss_itm"] = self._itm_loss(img, txt, scale * cls_img @ cls_txt.T, groups)
            loss = loss + self.train_cfg.itm_weight * out["loss_itm"]
        if "distill" in m.spec.losses and images.shape[0] > 1 and self.train_cfg.distill_weight:
            out["loss_distill"] = self._distill_loss(img, txt, scale * image_emb @ text_emb.T, groups)
            loss = loss + self.train_cfg.distill_weight * out["loss_distill"]
        if "token" in m.spec.losses:
            out["loss_token"] = token_contrastive_loss(img.tokens, txt.tokens, txt.padding, scale, groups)
            loss = loss + self.train_cfg.token_weight * out["loss_token"]
        if teacher_image is not None and self.train_cfg.reinforce_weight:
            student = (image_emb, text_emb) if m.uses_experts else (cls_img, cls_txt)  # the retrieval embeddings
            out["loss_reinforce"] = self._reinforce_loss(*student, teacher_image, teacher_text, scale)
            loss = loss + self.train_cfg.reinforce_weight * out["loss_reinforce"]
        out["loss"] = loss
        return out

    def _reinforce_loss(self, student_img, student_txt, teacher_img, teacher_txt, scale) -> torch.Tensor:
        """MobileCLIP's similarity distillation over the global batch (train/reinforce.py)."""
        student_img, student_txt = student_img.float(), student_txt.float()
        teacher_img, teacher_txt = teacher_img.float(), teacher_txt.float()
        gathered = [gather_with_grad(x)[0] for x in (student_img, student_txt, teacher_img, teacher_txt)]
        return similarity_distillation_loss(student_img, student_txt, gathered[0], gathered[1], teacher_img,
                                            teacher_txt, gathered[2], gathered[3], scale, self.teacher_scale)

    def _itm_loss(self, img, txt, similarity: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        neg_txt, neg_img = sample_hard_negatives(similarity.detach(), groups)
        m = self.model
        pos = m.match_logits(img, txt)
        neg_a = m.match_logits(img, txt.select(neg_txt))
        neg_b = m.match_logits(img.select(neg_img), txt)
        logits = torch.cat([pos, neg_a, neg_b])
        labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg_a) + len(neg_b))]).long().to(logits.device)
        return F.cross_entropy(logits, labels)

    def _distill_loss(self, img, txt, similarity: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """CPRD both ways: texts' negative images and images' negative texts."""
        k, ranked = self.train_cfg.distill_candidates, self.train_cfg.distill_ranked
        losses = []
        for sim, queries_are_texts in ((similarity.T, True), (similarity, False)):
            candidates = hardest_negatives(sim.detach(), k, groups)  # [N, k]
            rows = torch.arange(sim.shape[0], device=sim.device).unsqueeze(1).expand_as(candidates)
            image_rows, text_rows = (candidates, rows) if queries_are_texts else (rows, candidates)
            with torch.no_grad():
                logits = self.model.itm_logits(img.select(image_rows.reshape(-1)), txt.select(text_rows.reshape(-1)))
                teacher = (logits[:, 1] - logits[:, 0]).reshape(candidates.shape)
            losses.append(partial_ranking_loss(sim.gather(1, candidates), teacher, ranked))
        return sum(losses) / 2
