import pytest
import torch
import torch.nn.functional as F

from entityclip.config import ModelConfig, TrainConfig
from entityclip.errors import ConfigError
from entityclip.models import VARIANTS, build_model
from entityclip.models.checkpoint import load_model, save_checkpoint
from entityclip.train.objective import Objective, contrastive_loss, positive_targets, sample_hard_negatives

TINY = dict(image_size=32, patch_size=8, width=32, embed_dim=32, layers=1, heads=2, context_length=32,
            n_vision_experts=1, n_shared_experts=1, n_text_experts=1, fusion_layers=1)
TEXTS = ["Velmora Rovers lift the cup.", "Thipa Syndicate open their season.", "Zensha Union return home."]
EXPLS = ["a red circle with white stripes", "a blue square with dots", "a green cross with checks"]


def model(variant="entityclip"):
    torch.manual_seed(0)
    return build_model(ModelConfig(variant=variant, **TINY)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_embeds_to_unit_vectors(variant):
    m = model(variant)
    images = torch.randn(3, 3, 32, 32)
    img, txt = m.embed_images(images), m.embed_texts(TEXTS, EXPLS)
    assert img.shape == txt.shape == (3, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_unknown_variant_is_a_config_error():
    from entityclip.config import load_config

    with pytest.raises(ConfigError, match="model.variant='nope'; choose one of"):
        load_config(None, ["model.variant=nope"])


def test_image_embeddings_do_not_depend_on_the_batch_so_a_gallery_is_indexable():
    m = model()
    images = torch.randn(4, 3, 32, 32)
    assert torch.allclose(m.embed_images(images)[:1], m.embed_images(images[:1]), atol=1e-5)


def test_only_entityclip_reads_the_explanation():
    with_expl = model("entityclip")
    assert not torch.allclose(with_expl.embed_texts(TEXTS, EXPLS), with_expl.embed_texts(TEXTS, EXPLS[::-1]))
    ablation = model("entityclip_noexpl")
    assert torch.allclose(ablation.embed_texts(TEXTS, EXPLS), ablation.embed_texts(TEXTS, EXPLS[::-1]))


def test_match_probability_comes_from_the_itm_head_or_is_nan():
    images = torch.randn(3, 3, 32, 32)
    p = model().match_probability(images, TEXTS, EXPLS)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    assert model("clip_finetune").match_probability(images, TEXTS, EXPLS).isnan().all()


def test_hard_negatives_are_never_the_positive():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    for _ in range(50):
        neg_txt, neg_img = sample_hard_negatives(sim)
        assert (neg_txt != torch.arange(6)).all() and (neg_img != torch.arange(6)).all()


def test_hard_negatives_never_come_from_the_rows_group():
    torch.manual_seed(0)
    sim = torch.randn(6, 6)
    sim[0, 1] = sim[1, 0] = 20.0  # rows 0 and 1 show the same entities and look most alike
    groups = torch.tensor([7, 7, 1, 2, 3, 4])
    for _ in range(50):
        neg_txt, neg_img = sample_hard_negatives(sim, groups)
        assert (groups[neg_txt] != groups).all() and (groups[neg_img] != groups).all()


def test_the_contrastive_target_spreads_over_the_rows_showing_the_same_entities():
    targets = positive_targets(torch.tensor([5, 9, 5, 2]), 4, 0, "cpu")
    assert torch.equal(targets, torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]]))
    assert torch.equal(positive_targets(None, 3, 4, "cpu"), torch.tensor([4, 5, 6]))


def test_rows_of_one_group_are_not_each_others_negatives():
    """Swapping the texts of two rows that show the same entities leaves the loss unchanged;
    with pair targets it would change (the swap makes both rows' own pairs wrong)."""
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    swapped = txt[[2, 1, 0, 3]]
    groups, scale = torch.tensor([5, 9, 5, 2]), torch.tensor(10.0)
    assert contrastive_loss(img, swapped, scale, groups) == pytest.approx(contrastive_loss(img, txt, scale, groups).item())
    assert contrastive_loss(img, swapped, scale) != pytest.approx(contrastive_loss(img, txt, scale).item())
    # Rows in groups of their own are scored exactly as with pair targets.
    distinct = torch.arange(4)
    assert contrastive_loss(img, txt, scale, distinct) == pytest.approx(contrastive_loss(img, txt, scale).item())


@pytest.mark.parametrize("variant", ["entityclip", "clip_finetune", "filip", "xattn_fusion"])
def test_objective_overfits_a_small_batch(variant):
    m = model(variant).train()
    objective = Objective(m, TrainConfig())
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    images = torch.randn(3, 3, 32, 32)
    ids, expl = m.tokenize(TEXTS), m.tokenize(EXPLS) if m.uses_explanations else None
    losses = []
    for _ in range(30):
        out = objective(images, ids, expl)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert ("loss_itm" in out) == (variant in ("entityclip", "xattn_fusion"))
    assert ("loss_token" in out) == (variant == "filip")


def test_checkpoint_roundtrip_gives_identical_embeddings(tmp_path):
    m = model()
    save_checkpoint(m, tmp_path / "ckpt", {"train_loss": 1.0})
    loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded.model_cfg == m.model_cfg
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(m.embed_images(images), loaded.embed_images(images))
    assert torch.allclose(m.embed_texts(TEXTS, EXPLS), loaded.embed_texts(TEXTS, EXPLS))


def test_experts_read_at_one_token_equal_a_full_sequence_pass():
    from entityclip.models.mmae import MMAE

    torch.manual_seed(0)
    mmae = MMAE(16, 1, 1, 2)
    tokens, eot = torch.randn(3, 10, 16), torch.tensor([4, 9, 6])
    pad = torch.arange(10).unsqueeze(0) > eot.unsqueeze(1)
    full = torch.stack([e(tokens, tokens, pad)[torch.arange(3), eot] for e in mmae.text], dim=1)
    assert torch.allclose(mmae.text_experts(tokens, pad, eot), full, atol=1e-5)


def test_init_from_a_bare_open_clip_state_dict_loads_the_backbone(tmp_path):
    from safetensors.torch import save_file

    from entityclip.errors import StorageError
    from entityclip.models.checkpoint import init_from

    source = model("clip_finetune")
    (tmp_path / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in source.clip.state_dict().items()}, str(tmp_path / "clip" / "model.safetensors"))
    torch.manual_seed(1)
    target = build_model(ModelConfig(variant="entityclip", **TINY))
    init_from(target, str(tmp_path / "clip"))
    assert torch.equal(target.clip.visual.proj, source.clip.visual.proj)

    other = build_model(ModelConfig(variant="entityclip", **{**TINY, "width": 48, "embed_dim": 48}))
    with pytest.raises(StorageError, match="do not fit this model"):
        init_from(other, str(tmp_path / "clip"))


def test_every_variant_the_config_names_has_one_spec():
    from entityclip.models.entityclip import VARIANT_SPECS

    assert tuple(VARIANT_SPECS) == VARIANTS
    for name, spec in VARIANT_SPECS.items():
        built = model(name)
        assert (built.reranker, built.uses_experts, built.uses_explanations, built.trainable) == \
            (spec.reranker, spec.experts, spec.explanations, spec.trainable)
        assert built.has_match_head == (spec.reranker in ("itm", "xattn_fusion"))
