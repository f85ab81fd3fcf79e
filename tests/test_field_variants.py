"""The field's matchers as variants: each one's defining computation, and each through the same
train → index → evaluate path as EntityCLIP."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from entityclip.config import ModelConfig, TrainConfig
from entityclip.models import build_model
from entityclip.models.perturbation import object_subspace, patch_mask, perturb_toward_objects
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
    from entityclip.train.checkpoint import load_model, save_checkpoint

    cfg = with_variant(trained_run["cfg"], "qperturb")
    paths = RunPaths.for_config(cfg)
    qperturb = build_model(cfg.model)
    qperturb.load_state_dict(load_model(paths.checkpoint("entityclip")).state_dict())
    save_checkpoint(qperturb, paths.checkpoint("qperturb"))
    index = _index_and_evaluate(cfg)
    images = index.meta["images"]
    assert all(len(m["boxes"]) == len(m["entities"]) for m in images)  # the synthetic world's boxes reached it
    plain = EmbeddingIndex.load(paths.index("entityclip"))  # the same weights without the perturbation
    assert not np.allclose(index.embeddings["images"], plain.embeddings["images"], atol=1e-4)
    assert np.allclose(index.embeddings["texts"], plain.embeddings["texts"], atol=1e-5)
