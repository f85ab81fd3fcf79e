"""The field's matchers as variants: each one's defining computation, and each through the same
train → index → evaluate path as EntityCLIP."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from entityclip.config import ModelConfig, TrainConfig
from entityclip.errors import ConfigError
from entityclip.models import build_model
from entityclip.models.adapatch import AdaPatch
from entityclip.models.backbone import word_positions
from entityclip.models.late_interaction import pair_similarities, token_similarities
from entityclip.models.xattn_fusion import LayerFusion
from entityclip.models.perturbation import object_subspace, patch_centres, patch_mask, perturb_toward_objects
from entityclip.train.objective import Objective, hardest_negatives, partial_ranking_loss

TINY = dict(image_size=32, patch_size=8, width=32, embed_dim=32, layers=1, heads=2, context_length=32,
            n_vision_experts=1, n_shared_experts=1, n_text_experts=1)
TEXTS = ["Velmora Rovers lift the cup.", "Thipa Syndicate open their season.", "Zensha Union return home.",
         "Lorbar Works unveil plans.", "Nimdro Riders draw crowds."]
EXPLS = ["a red circle with white stripes", "a blue square with dots", "a green cross with checks",
         "a yellow bar, solid", "a purple diamond with stripes"]


# --- qperturb: object-aware query perturbation -----------------------------------------------

def test_patch_mask_marks_the_patches_whose_centres_lie_in_a_box():
    mask = patch_mask([[0.0, 0.0, 0.5, 0.5]], grid=4).reshape(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(mask, expected)
    assert not patch_mask([], grid=4).any()


def test_perturbation_grows_the_object_subspace_and_leaves_every_other_direction_unchanged():
    torch.manual_seed(0)
    embedding, patches = torch.randn(1, 16), torch.randn(1, 9, 16)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, :4] = True
    u = object_subspace(patches[0][mask[0]], rank=2)
    perturbed = perturb_toward_objects(embedding, patches, mask, alpha=0.5, rank=2)

    inside = lambda x: (x @ u.T) @ u  # noqa: E731  (projection onto the object subspace)
    assert torch.allclose(perturbed - inside(perturbed), embedding - inside(embedding), atol=1e-5)
    assert torch.allclose(inside(perturbed), 1.5 * inside(embedding), atol=1e-5)
    assert torch.allclose(u @ u.T, torch.eye(2), atol=1e-5)


def test_an_image_without_boxes_is_not_perturbed():
    torch.manual_seed(0)
    embedding = torch.randn(2, 16)
    perturbed = perturb_toward_objects(embedding, torch.randn(2, 9, 16), torch.zeros(2, 9, dtype=torch.bool), 1.0, 2)
    assert torch.equal(perturbed, embedding)


def test_qperturb_changes_an_image_embedding_only_where_boxes_are_given():
    torch.manual_seed(0)
    qperturb = build_model(ModelConfig(variant="qperturb", **TINY)).eval()
    entityclip = build_model(ModelConfig(variant="entityclip", **TINY)).eval()
    entityclip.load_state_dict(qperturb.state_dict())  # the same weights: qperturb is training-free
    images = torch.randn(2, 3, 32, 32)
    boxes = [[[0.1, 0.1, 0.6, 0.6]], []]
    plain, perturbed = entityclip.embed_images(images, boxes), qperturb.embed_images(images, boxes)
    assert not torch.allclose(plain[0], perturbed[0], atol=1e-4)
    assert torch.allclose(plain[1], perturbed[1], atol=1e-6)
    assert torch.allclose(perturbed.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(qperturb.embed_images(images), plain, atol=1e-6)


# --- cprd: contrastive partial ranking distillation -------------------------------------------

def test_partial_ranking_loss_is_the_plackett_luce_likelihood_of_the_teachers_top_places():
    student = torch.tensor([[1.0, 3.0, 2.0]])
    teacher = torch.tensor([[0.1, 0.9, 0.5]])  # order: candidate 1, then 2, then 0
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
    first = lse(3.0, 2.0, 1.0) - 3.0
    second = lse(2.0, 1.0) - 2.0
    assert partial_ranking_loss(student, teacher, ranked=2).item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert partial_ranking_loss(student, teacher, ranked=1).item() == pytest.approx(first, rel=1e-6)


def test_the_student_is_taught_only_the_order_of_the_ranked_places():
    teacher = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    agreeing, disagreeing = torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert partial_ranking_loss(agreeing, teacher, 2) < partial_ranking_loss(disagreeing, teacher, 2)
    # Swapping the two places below the cut-off changes nothing: their order is not taught.
    swapped_tail = torch.tensor([[4.0, 3.0, 1.0, 2.0]])
    assert partial_ranking_loss(swapped_tail, teacher, 2) == pytest.approx(partial_ranking_loss(agreeing, teacher, 2).item())


def test_the_ranked_candidates_are_the_hardest_negatives_never_the_positive():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.0, 0.9, 0.1, 0.8], [0.7, 0.6, 0.9, 0.0], [0.2, 0.3, 0.1, 0.9]])
    assert hardest_negatives(sim, 2).tolist() == [[2, 3], [3, 2], [0, 1], [1, 0]]
    assert hardest_negatives(sim, 10).shape == (4, 3)
    sim[0, 1] = 0.8  # rows 0 and 1 show the same entities: never each other's negatives
    assert hardest_negatives(sim, 2)[0].tolist() == [1, 2]
    assert hardest_negatives(sim, 2, torch.tensor([4, 4, 1, 2]))[:2].tolist() == [[2, 3], [3, 2]]


def test_cprd_distils_into_the_dual_encoder_and_never_into_its_teacher():
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="cprd", **TINY)).train()
    only_distill = TrainConfig(plain_weight=0, gated_weight=0, itm_weight=0, explanation_weight=0,
                               distill_weight=1.0, distill_candidates=3, distill_ranked=2)
    out = Objective(m, only_distill)(torch.randn(5, 3, 32, 32), m.tokenize(TEXTS), m.tokenize(EXPLS))
    out["loss"].backward()
    assert out["loss_distill"].item() > 0
    assert m.itm_head.weight.grad is None or not m.itm_head.weight.grad.any()
    assert m.image_gate.proj.weight.grad.abs().sum() > 0 and m.text_gate.proj.weight.grad.abs().sum() > 0


def test_only_cprd_pays_for_distillation():
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="entityclip", **TINY)).train()
    out = Objective(m, TrainConfig())(torch.randn(5, 3, 32, 32), m.tokenize(TEXTS), m.tokenize(EXPLS))
    assert "loss_distill" not in out


# --- filip: token-wise late interaction --------------------------------------------------------

def test_late_interaction_is_the_mean_of_each_tokens_best_match():
    # Image tokens and text tokens on the unit axes, so every cosine is 0 or 1 (or -1).
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # [1 image, 3 tokens, 2 dims]
    txt = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # [1 text, 3 tokens]; the last is padding
    padding = torch.tensor([[False, False, True]])
    image_to_text, text_to_image = token_similarities(img, txt, padding)
    # image → text: each image token's best non-padding text token: 1, 0, -1 → mean 0
    assert image_to_text.item() == pytest.approx(0.0)
    # text → image: each non-padding text token's best image token: 1, 1 → mean 1
    assert text_to_image.item() == pytest.approx(1.0)
    i2t, t2i = pair_similarities(img, txt, padding)
    assert (i2t.item(), t2i.item()) == (pytest.approx(0.0), pytest.approx(1.0))


def test_the_all_pairs_and_aligned_pairs_late_interactions_agree():
    torch.manual_seed(0)
    img, txt = torch.randn(3, 5, 8), torch.randn(3, 4, 8)
    padding = torch.tensor([[False] * 4, [False, False, True, True], [False, True, True, True]])
    image_to_text, text_to_image = token_similarities(img, txt, padding)
    i2t, t2i = pair_similarities(img, txt, padding)
    assert torch.allclose(image_to_text.diagonal(), i2t, atol=1e-6)
    assert torch.allclose(text_to_image.diagonal(), t2i, atol=1e-6)


def test_filip_trains_its_tokens_with_the_token_wise_contrastive_loss():
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="filip", **TINY)).train()
    only_tokens = TrainConfig(plain_weight=0, token_weight=1.0)
    images, ids = torch.randn(5, 3, 32, 32), m.tokenize(TEXTS)
    out = Objective(m, only_tokens)(images, ids, None)
    img, txt = m.encode_images(images), m.encode_texts(ids)
    image_to_text, text_to_image = token_similarities(img.tokens, txt.tokens, txt.padding)
    target = torch.arange(5)
    expected = (F.cross_entropy(m.logit_scale * image_to_text, target)
                + F.cross_entropy(m.logit_scale * text_to_image.T, target)) / 2
    assert out["loss_token"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert m.reranker == "late_interaction" and not m.uses_explanations


# --- adamatch: patches of adaptive size and position, matched to words ------------------------------

def test_the_patch_grid_centres_are_row_major_fractions_of_the_side():
    assert patch_centres(4).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    with pytest.raises(ValueError, match="square grid"):
        patch_centres(6)


def test_an_adaptive_patch_finds_the_region_its_query_attends_to_and_pools_it():
    grid, dim = 8, 16
    v = F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(0)), dim=0)
    tokens = -v.repeat(grid * grid, 1)
    inside = [(y, x) for y in range(2, 4) for x in range(4, 7)]  # a 3x2 block, right of centre, near the top
    for y, x in inside:
        tokens[y * grid + x] = v
    ada = AdaPatch(dim, patches=1)
    with torch.no_grad():
        ada.queries.copy_(50 * ada.norm(v.unsqueeze(0)))  # a query that looks for v
    features, boxes = ada(tokens.unsqueeze(0))
    x0, y0, x1, y1 = boxes[0, 0].tolist()
    assert (x0 + x1) / 2 == pytest.approx(5.5 / grid, abs=0.02) and (y0 + y1) / 2 == pytest.approx(3 / grid, abs=0.02)
    assert x1 - x0 > y1 - y0  # wider than tall, as the block is
    # the box is the block's extent: patches 4-6 across, 2-3 down
    assert boxes[0, 0].tolist() == pytest.approx([4 / grid, 2 / grid, 7 / grid, 4 / grid], abs=0.02)
    assert F.cosine_similarity(features[0, 0], v, dim=0) > 0.9  # the window pools the block


def test_adamatch_learns_where_its_patches_go_through_the_token_wise_loss():
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="adamatch", adaptive_patches=3, **TINY)).train()
    img = m.encode_images(torch.randn(5, 3, 32, 32))
    assert img.tokens.shape == (5, 1 + 3, 32) and img.regions.shape == (5, 3, 4)
    assert (img.regions[..., :2] <= img.regions[..., 2:]).all() and ((img.regions >= 0) & (img.regions <= 1)).all()
    out = Objective(m, TrainConfig(plain_weight=0, token_weight=1.0))(torch.randn(5, 3, 32, 32), m.tokenize(TEXTS), None)
    out["loss_token"].backward()
    assert m.adapatch.queries.grad.abs().sum() > 0  # positions and sizes are learned
    assert m.reranker == "late_interaction" and not m.uses_explanations


def test_words_are_grouped_from_their_bpe_pieces():
    m = build_model(ModelConfig(variant="adamatch", **TINY))
    ids = m.tokenize(["Velmora Rovers lift the cup."])[0]
    words = word_positions(m.tokenizer, ids, int(ids.argmax()))
    assert [w for w, _ in words] == ["velmora", "rovers", "lift", "the", "cup", "."]
    assert [p for _, positions in words for p in positions] == list(range(1, int(ids.argmax())))


def test_explanation_token_alignment_contrasts_image_patches_with_explanation_words():
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="entityclip", **TINY)).train()
    images, ids, expl = torch.randn(5, 3, 32, 32), m.tokenize(TEXTS), m.tokenize(list(reversed(TEXTS)))
    assert "loss_explanation_tokens" not in Objective(m, TrainConfig())(images, ids, expl)  # off by default
    out = Objective(m, TrainConfig(explanation_token_weight=1.0))(images, ids, expl)
    img, txt = m.encode_images(images), m.encode_texts(ids, expl)
    image_to_text, text_to_image = token_similarities(img.tokens, txt.expl_tokens, txt.expl_padding)
    target = torch.arange(5)
    expected = (F.cross_entropy(m.logit_scale * image_to_text, target)
                + F.cross_entropy(m.logit_scale * text_to_image.T, target)) / 2
    assert out["loss_explanation_tokens"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss_explanation_tokens"].backward()
    assert m.clip.visual.conv1.weight.grad.abs().sum() > 0  # it trains the image tower's patches


# --- xattn_fusion: cross-modal attention over features fused from several layers --------------

def test_layer_fusion_starts_as_the_mean_of_the_layers_and_learns_their_weights():
    fusion = LayerFusion(2)
    shallow, deep = torch.zeros(1, 3, 4), torch.ones(1, 3, 4)
    assert torch.allclose(fusion([shallow, deep]), torch.full((1, 3, 4), 0.5))
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([-1e9, 0.0]))
    assert torch.allclose(fusion([shallow, deep]), deep)


def test_xattn_fusion_reads_several_layers_and_scores_pairs_by_cross_attention():
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="xattn_fusion", **{**TINY, "layers": 2}, fusion_layers=2)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m.image_fusion.logits.copy_(torch.tensor([-1e9, 0.0]))  # only the last layer
        last_only = m.encode_images(images).tokens
        m.image_fusion.logits.zero_()
        fused = m.encode_images(images).tokens
    assert not torch.allclose(last_only, fused, atol=1e-4)  # the earlier layer reaches the matcher
    img, txt = m.encode_images(images), m.text_features(TEXTS[:2])
    swapped = txt.select(torch.tensor([1, 0]))
    # The image's side of the matcher attends to the text: another text, another score.
    assert not torch.allclose(m.pair_scores(img, txt, True), m.pair_scores(img, swapped, True), atol=1e-5)


def test_xattn_fusion_learns_matching_with_hard_negatives():
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="xattn_fusion", **TINY, fusion_layers=1)).train()
    out = Objective(m, TrainConfig(plain_weight=0, itm_weight=1.0))(torch.randn(5, 3, 32, 32), m.tokenize(TEXTS), None)
    out["loss"].backward()
    assert out["loss_itm"].item() > 0
    assert m.matcher.head[-1].weight.grad.abs().sum() > 0
    assert m.image_fusion.logits.grad is not None


def test_fusing_more_layers_than_the_backbone_has_is_a_config_error():
    with pytest.raises(ConfigError, match="fusion_layers"):
        build_model(ModelConfig(variant="xattn_fusion", **TINY, fusion_layers=3))


# --- vista: composed queries -------------------------------------------------------------------

def test_the_text_tower_without_a_prefix_gives_its_own_text_embedding():
    from entityclip.models import backbone

    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="vista", **TINY)).eval()
    ids = model.tokenize(TEXTS[:3])
    with torch.no_grad():
        own, _, _ = backbone.text_tokens(model.clip, ids)
        prefixed = backbone.prefixed_text_embedding(model.clip, torch.zeros(3, 0, backbone.text_width(model.clip)), ids)
    assert torch.allclose(prefixed, own, atol=1e-5)


def test_a_vista_query_reads_both_its_image_and_its_text():
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="vista", **TINY)).eval()
    images = torch.randn(2, 3, 32, 32)
    query = model.embed_composed(images, ["this emblem, but on a sandy beach."] * 2)
    other_text = model.embed_composed(images, ["this emblem, but on a snowy slope."] * 2)
    assert not torch.allclose(query[0], query[1], atol=1e-4)  # other image, same text
    assert not torch.allclose(query, other_text, atol=1e-4)  # same image, other text
    assert torch.allclose(query.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_every_other_variant_composes_a_query_as_the_sum_of_its_two_embeddings():
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="entityclip", **TINY)).eval()
    images = torch.randn(2, 3, 32, 32)
    composed = model.embed_composed(images, TEXTS[:2], EXPLS[:2])
    expected = F.normalize(model.embed_images(images) + model.embed_texts(TEXTS[:2], EXPLS[:2]), dim=-1)
    assert torch.allclose(composed, expected, atol=1e-5)


def test_a_masked_contrastive_loss_is_the_loss_over_its_rows_alone():
    from entityclip.train.objective import contrastive_loss

    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    rows = torch.tensor([True, False, True, True, False, True])
    scale = torch.tensor(10.0)
    assert contrastive_loss(img, txt, scale, rows=rows).item() == pytest.approx(
        contrastive_loss(img[rows], txt[rows], scale).item(), rel=1e-5)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # soft targets: zero where masked, never NaN
    assert contrastive_loss(img, txt, scale, groups, rows).item() == pytest.approx(
        contrastive_loss(img[rows], txt[rows], scale, groups[rows]).item(), rel=1e-5)
    assert contrastive_loss(img, txt, scale, rows=torch.zeros(6, dtype=torch.bool)).item() == 0.0


def test_vista_learns_composed_queries_through_the_image_tokens_it_reads():
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="vista", **TINY))
    objective = Objective(model, TrainConfig())
    images, references = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    ids = model.tokenize(["a", "b", "this emblem, but on a sandy beach.", "this emblem, but on a snowy slope."])
    composed = torch.tensor([False, False, True, True])
    losses = objective(images, ids, None, references=references, composed=composed)
    assert losses["loss_composed"] > 0
    losses["loss"].backward()
    assert model.image_prefix.weight.grad.abs().sum() > 0 and model.prefix_position.grad.abs().sum() > 0
    # Its plain loss covers the plain pairs only.
    plain = Objective(model, TrainConfig())(images[:2], ids[:2], None)["loss_plain"]
    assert losses["loss_plain"].item() == pytest.approx(plain.item(), rel=1e-5)


# --- end to end: the same trainer, index and evaluator ------------------------------------------

def _index_and_evaluate(cfg, run_id=None):
    from entityclip import storage
    from entityclip.index import EmbeddingIndex
    from entityclip.paths import RunPaths
    from entityclip.pipeline import stage_evaluate, stage_index

    stage_index(cfg)
    metrics = stage_evaluate(cfg, run_id)
    paths = RunPaths.for_config(cfg)
    assert storage.exists(paths.evaluation(cfg.model.variant))
    for split in ("test_seen", "test_unseen"):
        assert 0 <= metrics[split]["rsum"] <= 600 and metrics[split]["n"] > 0
    return EmbeddingIndex.load(paths.index(cfg.model.variant))


@pytest.mark.slow
def test_cprd_trains_indexes_and_evaluates_on_the_shared_path(trained_run):
    from mlflow.tracking import MlflowClient

    from entityclip.pipeline import stage_train, with_variant

    cfg = with_variant(trained_run["cfg"], "cprd")
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, num_workers=1))  # the path, not the recall
    result = stage_train(cfg, progress=False)
    logged = MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert logged["train/loss_distill"] > 0  # tracked like any run's losses
    _index_and_evaluate(cfg, result.run_id)


@pytest.mark.slow
def test_qperturb_indexes_the_gallery_with_its_object_boxes(trained_run):
    """qperturb trains exactly as entityclip (the perturbation is training-free), so the
    session's trained entityclip weights stand in for its training run."""
    from entityclip.index import EmbeddingIndex
    from entityclip.paths import RunPaths
    from entityclip.pipeline import with_variant
    from entityclip.models.checkpoint import load_model, save_checkpoint

    cfg = with_variant(trained_run["cfg"], "qperturb")
    paths = RunPaths.for_config(cfg)
    qperturb = build_model(cfg.model)
    qperturb.load_state_dict(load_model(paths.checkpoint("entityclip")).state_dict())
    save_checkpoint(qperturb, paths.checkpoint("qperturb"))
    index = _index_and_evaluate(cfg)
    images = index.meta["images"]
    # the synthetic world's boxes reached it (a composed query's target: one emblem, no name)
    assert all(len(m["boxes"]) == (1 if m["reference_uri"] else len(m["entities"])) for m in images)
    plain = EmbeddingIndex.load(paths.index("entityclip"))  # the same weights without the perturbation
    assert not np.allclose(index.embeddings["images"], plain.embeddings["images"], atol=1e-4)
    assert np.allclose(index.embeddings["texts"], plain.embeddings["texts"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant, losses, reranker, teacher", [
    # filip also learns from the session's trained entityclip (reinforced training), on the same run
    ("filip", ["loss_token", "loss_reinforce"], "late_interaction", "entityclip"),
    ("xattn_fusion", ["loss_itm"], "xattn_fusion", ""),
    ("adamatch", ["loss_token"], "late_interaction", "")])
def test_a_reranking_variant_trains_evaluates_and_serves_two_stage_retrieval(trained_run, unseen_sample,
                                                                             variant, losses, reranker, teacher):
    from mlflow.tracking import MlflowClient

    from entityclip.data.images import load_image_tensor
    from entityclip.pipeline import stage_train, with_variant
    from entityclip.retrieval import Retriever

    cfg = with_variant(trained_run["cfg"], variant)
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, num_workers=1, reinforce_teacher=teacher),  # the path
                  model=replace(cfg.model, layers=2, fusion_layers=2))
    result = stage_train(cfg, progress=False)
    logged = MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert all(logged[f"train/{loss}"] > 0 for loss in losses)
    _index_and_evaluate(cfg, result.run_id)
    metrics = _saved_evaluation(cfg)
    for split in ("test_seen", "test_unseen"):  # the first stage alone and the two-stage retrieval
        assert metrics[f"{reranker}/{split}"]["rerank_k"] == cfg.serve.rerank_k
        assert 0 <= metrics[f"{reranker}/{split}"]["rsum"] <= 600

    retriever = Retriever.load(config=cfg, variant=variant)
    assert retriever.info["reranker"] == reranker  # serve.rerank = auto runs the variant's own
    answer = retriever.search_text(unseen_sample["text"], k=cfg.serve.rerank_k + 2)
    rescored = [h["rerank_score"] for h in answer["results"]]
    assert rescored[:cfg.serve.rerank_k] == sorted(rescored[:cfg.serve.rerank_k], reverse=True)
    assert rescored[cfg.serve.rerank_k:] == [None, None]  # beyond rerank_k: the first stage's order
    # The gallery's stored tokens give the score the model gives the image itself.
    top = answer["results"][0]
    model = retriever.model
    pixels = load_image_tensor(retriever.gallery_image(top["sample_id"])[0], model.image_size).unsqueeze(0)
    with torch.no_grad():
        fresh = model.pair_scores(model.encode_images(pixels), model.text_features([unseen_sample["text"]]), True)
    assert fresh.item() == pytest.approx(top["rerank_score"], abs=1e-2)


@pytest.mark.slow
def test_vista_trains_on_composed_triplets_and_searches_with_the_composed_query(trained_run):
    from mlflow.tracking import MlflowClient

    from entityclip import storage
    from entityclip.data.images import load_image_tensor
    from entityclip.pipeline import stage_train, with_variant
    from entityclip.retrieval import Retriever

    cfg = with_variant(trained_run["cfg"], "vista")
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, num_workers=1))  # the path, not the recall
    result = stage_train(cfg, progress=False)
    assert MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics["train/loss_composed"] > 0
    index = _index_and_evaluate(cfg, result.run_id)
    assert _saved_evaluation(cfg)["test_composed"]["n"] == 8  # 2 unseen entities x 4 settings

    # The index keeps each composed query as it is asked (its reference image and its text),
    # apart from the texts that image search returns.
    assert not any(m["reference_uri"] for m in index.meta["texts"])
    queries = index.meta["composed"]
    row = next(i for i in range(len(queries)) if queries[i]["split"] == "test_composed")
    query = queries[row]
    retriever = Retriever.load(config=cfg, variant="vista")
    reference = storage.read_bytes(query["reference_uri"])
    pixels = load_image_tensor(reference, retriever.model.image_size).unsqueeze(0)
    expected = retriever.model.embed_composed(pixels, [query["text"]]).numpy()[0]
    assert np.allclose(index.embeddings["composed"][row], expected, atol=1e-5)
    # Searching with it ranks the gallery's images by that embedding.
    answer = retriever.search_composed(reference, query["text"], k=5)
    order = np.argsort(-(index.embeddings["images"] @ expected), kind="stable")[:5]
    assert [h["sample_id"] for h in answer["results"]] == [index.meta["images"][int(j)]["sample_id"] for j in order]


@pytest.mark.slow
def test_cora_trains_its_scene_graphs_and_is_scored_on_the_compositional_split(trained_run, unseen_sample):
    from mlflow.tracking import MlflowClient

    from entityclip.pipeline import stage_train, with_variant
    from entityclip.retrieval import Retriever

    cfg = with_variant(trained_run["cfg"], "cora")
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, num_workers=1))  # the path, not the recall
    result = stage_train(cfg, progress=False)
    logged = MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert logged["train/loss_caption"] > 0 and logged["train/loss_objects"] > 0  # boxes reached the workers
    _index_and_evaluate(cfg, result.run_id)
    compositional = _saved_evaluation(cfg)["test_compositional"]
    assert 0 <= compositional["t2i_pair"] <= 100 and compositional["n"] == 8
    answer = Retriever.load(config=cfg, variant="cora").search_text(unseen_sample["text"], k=3)
    assert len(answer["results"]) == 3 and answer["model"]["variant"] == "cora"


@pytest.mark.slow
def test_adamatch_shows_the_region_each_query_word_matched(trained_run, unseen_sample):
    """The explanation path needs no training: an untrained adamatch packaged into the run root."""
    from entityclip.errors import InputError
    from entityclip.models.checkpoint import save_checkpoint
    from entityclip.paths import RunPaths
    from entityclip.pipeline import stage_index, with_variant
    from entityclip.retrieval import Retriever

    cfg = with_variant(trained_run["cfg"], "adamatch")
    save_checkpoint(build_model(cfg.model), RunPaths.for_config(cfg).checkpoint("adamatch"))
    stage_index(cfg)
    retriever = Retriever.load(config=cfg, variant="adamatch")
    answer = retriever.word_regions("Velmora Rovers lift the cup", unseen_sample["sample_id"])
    assert [w["word"] for w in answer["words"]] == ["velmora", "rovers", "lift", "the", "cup"]
    for w in answer["words"]:
        x0, y0, x1, y1 = w["box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and -1 <= w["similarity"] <= 1
    with pytest.raises(InputError, match="no gallery image"):
        retriever.word_regions("Velmora Rovers", "e9999-000")
    with pytest.raises(InputError, match="variant entityclip has no adaptive patches"):
        Retriever.load(config=trained_run["cfg"], variant="entityclip").word_regions("x", unseen_sample["sample_id"])


def _saved_evaluation(cfg) -> dict:
    from entityclip import storage
    from entityclip.paths import RunPaths

    return storage.read_json(RunPaths.for_config(cfg).evaluation(cfg.model.variant))


# --- reinforce: MobileCLIP's distillation from stored teacher embeddings -----------------------

def test_similarity_distillation_vanishes_when_the_student_agrees_with_its_teacher():
    from entityclip.train.reinforce import similarity_distillation_loss

    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    loss = lambda s_img, s_txt, t_img, t_txt: similarity_distillation_loss(  # noqa: E731
        s_img, s_txt, s_img, s_txt, t_img, t_txt, t_img, t_txt, torch.tensor(10.0), 10.0)
    assert loss(img, txt, img, txt).item() == pytest.approx(0.0, abs=1e-6)
    other_img, other_txt = F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(4, 16), dim=-1)
    student = img.clone().requires_grad_()
    disagreeing = loss(student, txt, other_img, other_txt)  # the teacher may have another width
    disagreeing.backward()
    assert disagreeing.item() > 0.01 and student.grad.abs().sum() > 0


def test_teacher_embeddings_join_the_training_rows_by_sample_id(tmp_path):
    import pyarrow as pa

    from entityclip import storage
    from entityclip.errors import InputError
    from entityclip.train.reinforce import attach_teacher

    vectors = lambda x: pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).reshape(-1)), 2)  # noqa: E731
    uri = str(tmp_path / "teacher.parquet")
    storage.write_parquet(uri, pa.table({"sample_id": ["a", "b"], "image_embedding": vectors([[1, 0], [0, 1]]),
                                         "text_embedding": vectors([[2, 0], [0, 2]])}))
    rows = attach_teacher(pa.table({"sample_id": ["b", "a"]}), uri)
    assert rows["teacher_image"].to_pylist() == [[0.0, 1.0], [1.0, 0.0]]
    assert rows["teacher_text"].to_pylist() == [[0.0, 2.0], [2.0, 0.0]]
    with pytest.raises(InputError, match="sample c has no teacher embedding"):
        attach_teacher(pa.table({"sample_id": ["c"]}), uri)


def test_a_teacher_run_is_stored_beside_the_training_shards_and_cannot_teach_itself(trained_run, tmp_path):
    from entityclip import publish, storage
    from entityclip.paths import RunPaths
    from entityclip.pipeline import stage_train, with_variant
    from entityclip.models.checkpoint import load_model
    from entityclip.train.reinforce import teacher_scale, write_teacher_embeddings

    paths = RunPaths.for_config(trained_run["cfg"])
    out = str(tmp_path / "teacher-entityclip.parquet")
    rows = write_teacher_embeddings(paths.index("entityclip"), paths.checkpoint("entityclip"), out)
    stored = storage.read_parquet(out)
    samples = storage.read_parquet(paths.samples).to_pylist()
    # every sample with a caption (composed queries' targets have none to learn from)
    assert rows == stored.num_rows == sum(not s["reference_uri"] for s in samples)
    assert teacher_scale(out) == pytest.approx(load_model(paths.checkpoint("entityclip")).logit_scale.item())
    index = storage.read_parquet(storage.join(publish.current(paths.index("entityclip")), "texts.parquet")).to_pylist()
    text_of = {r["sample_id"]: r["embedding"] for r in index}
    first = stored.slice(0, 1).to_pylist()[0]
    assert first["text_embedding"] == pytest.approx(text_of[first["sample_id"]])  # rows joined by sample id

    cfg = trained_run["cfg"]
    with pytest.raises(ConfigError, match="the variant being trained"):
        stage_train(replace(cfg, train=replace(cfg.train, reinforce_teacher="entityclip")), progress=False)
    with pytest.raises(ConfigError, match="has no gallery index"):
        cfg = with_variant(cfg, "clip_finetune")
        stage_train(replace(cfg, train=replace(cfg.train, reinforce_teacher="entityclip_noexpl")), progress=False)
