"""Training-free re-rankers: MACK's word prototypes and HOSA's region reconstruction, each by
its defining computation, then as a second stage any model's index can run."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from entityclip import vector_index
from entityclip.config import IndexConfig, ModelConfig
from entityclip.errors import ConfigError
from entityclip.index import EmbeddingIndex
from entityclip.models import build_model, hosa, mack
from entityclip.rerank import Reranker, choose

TINY = dict(image_size=32, patch_size=8, width=32, embed_dim=32, layers=1, heads=2, context_length=32,
            n_vision_experts=1, n_shared_experts=1, n_text_experts=1)


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# --- HOSA ---------------------------------------------------------------------------------------

def test_a_region_in_the_span_of_the_words_is_rebuilt_and_one_orthogonal_to_them_is_not():
    words = unit([1, 0, 0, 0], [0, 1, 0, 0]).unsqueeze(0)  # [1, l=2, D=4]
    regions = unit([3, 4, 0, 0], [0, 0, 1, 0]).unsqueeze(0)  # in the span; orthogonal to it
    _, local = hosa.reconstruction(regions, words, torch.tensor([[True, True]]), ridge=1e-4)
    assert local[0, 0] == pytest.approx(1.0, abs=1e-3)
    assert local[0, 1] == pytest.approx(0.0, abs=1e-6)


def test_the_coefficients_solve_the_ridge_normal_equations():
    g = torch.Generator().manual_seed(0)
    words, regions = torch.randn(2, 5, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    h, _ = hosa.reconstruction(regions, words, mask, ridge=0.3)
    w, r = F.normalize(words, dim=-1), F.normalize(regions, dim=-1)
    assert torch.allclose((w @ w.transpose(1, 2) + 0.3 * torch.eye(5)) @ h, w @ r.transpose(1, 2), atol=1e-4)


def test_a_masked_word_cannot_help_rebuild_a_region():
    words = unit([1, 0, 0], [0, 0, 1]).unsqueeze(0)
    region = unit([0, 0, 1]).unsqueeze(0)
    _, kept = hosa.reconstruction(region, words, torch.tensor([[True, True]]), ridge=1e-4)
    _, masked = hosa.reconstruction(region, words, torch.tensor([[True, False]]), ridge=1e-4)
    assert kept.item() == pytest.approx(1.0, abs=1e-3) and masked.item() == pytest.approx(0.0, abs=1e-6)


def test_words_are_the_tokens_between_start_and_end_of_text():
    padding = torch.tensor([[False, False, False, False, True, True]])
    assert hosa.word_mask(padding, torch.tensor([3])).tolist() == [[False, True, True, False, False, False]]


def test_salient_regions_are_the_patches_closest_to_the_pooled_feature():
    tokens = torch.stack([unit([1, 0], [0, 1], [0.9, 0.1], [-1, 0], [0.7, 0.7])])  # token 0 pooled
    picked = hosa.salient_regions(tokens, regions=2)
    assert torch.allclose(picked[0], unit([0.9, 0.1], [0.7, 0.7]))


def test_a_text_whose_words_rebuild_the_salient_regions_scores_higher():
    image = torch.stack([unit([1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0])])  # pooled, then two patches
    # [SOT, word, word, EOT]: one text's words are the salient patches, the other's are not
    texts = torch.stack([unit([0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]),
                         unit([0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1])])
    scores = hosa.pair_scores(image.expand(2, -1, -1), texts, torch.zeros(2, 4, dtype=torch.bool), torch.tensor([3, 3]))
    assert scores[0] > 0.9 > 0.1 > scores[1]


# --- MACK ---------------------------------------------------------------------------------------

def grid_patches(features: dict[int, list[float]], dim: int = 3, grid: int = 2) -> torch.Tensor:
    """[grid*grid, dim] patches, zero but for the given ones (row-major index -> feature)."""
    patches = torch.zeros(grid * grid, dim)
    for i, f in features.items():
        patches[i] = torch.tensor(f)
    return patches


LEFT, RIGHT = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]  # halves of a 2x2 patch grid


def test_a_region_is_the_mean_of_the_patches_inside_its_box():
    patches = grid_patches({0: [1, 0, 0], 2: [0, 1, 0], 1: [0, 0, 1]})
    assert mack.region_features(patches, [LEFT]).tolist() == [[0.5, 0.5, 0.0]]  # patches 0 and 2


def test_a_words_prototype_is_the_mean_of_every_region_grounded_to_it():
    images = torch.stack([grid_patches({0: [1, 0, 0], 2: [1, 0, 0], 1: [0, 0, 1], 3: [0, 0, 1]}),
                          grid_patches({0: [0, 1, 0], 2: [0, 1, 0]})])
    prototypes = mack.build_prototypes(images, [["Velmora Rovers", "Thipa Union"], ["Kestrel Rovers"]],
                                       [[LEFT, RIGHT], [LEFT]])
    assert prototypes.words == ["kestrel", "rovers", "thipa", "union", "velmora"]
    vectors = dict(zip(prototypes.words, prototypes.vectors.tolist()))
    assert vectors["rovers"] == pytest.approx(F.normalize(torch.tensor([0.5, 0.5, 0]), dim=0).tolist())  # both teams
    assert vectors["velmora"] == pytest.approx([1, 0, 0]) and vectors["union"] == pytest.approx([0, 0, 1])


def test_a_pair_scores_its_known_words_best_patch_matches_above_their_baselines_and_unknown_words_nothing():
    prototypes = mack.WordPrototypes(["rovers", "velmora"], unit([1, 0, 0], [0, 1, 0]), torch.tensor([0.2, 0.4]))
    image = torch.stack([unit([1, 0, 0], [0, 0, 1])])  # shows rovers' prototype, not velmora's
    scores = mack.pair_scores(prototypes, image.expand(3, -1, -1),
                              ["Rovers win.", "Velmora Rovers win.", "Nimdro Riders win."])
    assert scores.tolist() == pytest.approx([0.8, (0.8 - 0.4) / 2, 0.0])


def test_a_words_baseline_is_its_mean_best_patch_match_over_the_labelled_images():
    vectors = unit([1, 0, 0])
    images = torch.stack([unit([1, 0, 0], [0, 1, 0]), unit([0, 1, 0], [0, 0, 1])])  # best 1.0, then 0.0
    assert mack.baselines(vectors, images).tolist() == pytest.approx([0.5])


def test_cycle_consistency_moves_each_prototype_toward_the_regions_that_choose_it():
    regions = unit([1, 0.1, 0], [1, -0.1, 0], [0, 0.1, 1], [0, -0.1, 1])
    start = mack.WordPrototypes(["a", "b"], unit([1, 0, 0.6], [0.6, 0, 1]), torch.zeros(2))
    labelled = regions.unsqueeze(0)  # one labelled image whose patches are the regions
    refined = mack.refine(start, regions, labelled, steps=200, lr=0.05)
    assert refined.words == start.words and torch.allclose(refined.vectors.norm(dim=1), torch.ones(2))
    centres = unit([1, 0, 0], [0, 0, 1])
    assert ((refined.vectors * centres).sum(1) > (start.vectors * centres).sum(1)).all()
    assert torch.allclose(refined.baselines, mack.baselines(refined.vectors, labelled))  # measured again
    assert mack.refine(start, regions[:1], labelled) is start  # nothing to be consistent with


# --- as a second stage ----------------------------------------------------------------------------

def tiny_index(model, train_boxes: bool = True) -> EmbeddingIndex:
    """A gallery of 4 random images with the model's own tokens and embeddings: two of split
    train (with boxes, unless not), two of test_seen."""
    torch.manual_seed(0)
    with torch.no_grad():
        features = model.encode_images(torch.randn(4, 3, 32, 32))
        images = model.image_embedding(features).numpy()
        texts_emb = model.embed_texts(["Velmora Rovers win.", "Thipa Union lose.", "Velmora Rovers draw.", "Kestrel Works."],
                                      ["a"] * 4).numpy()
    meta = {"sample_id": [f"s{i}" for i in range(4)], "image_uri": [f"/g/{i}.png" for i in range(4)],
            "text": ["Velmora Rovers win.", "Thipa Union lose.", "Velmora Rovers draw.", "Kestrel Works."],
            "explanation": ["a"] * 4, "split": ["train", "train", "test_seen", "test_seen"],
            "entities": [["Velmora Rovers"], ["Thipa Union"], ["Velmora Rovers"], ["Kestrel Works"]],
            "boxes": [[LEFT] if train_boxes else [], [RIGHT] if train_boxes else [], [LEFT], [RIGHT]]}
    tables = {k: pa.table({**meta, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1)), e.shape[1])})
              for k, e in (("images", images), ("texts", texts_emb))}
    searchers = {k: vector_index.build_faiss(e, IndexConfig()) for k, e in (("images", images), ("texts", texts_emb))}
    return EmbeddingIndex(tables, searchers, features.tokens.numpy().astype(np.float16))


@pytest.mark.parametrize("variant", ["entityclip", "clip_finetune", "filip"])
def test_any_model_can_ask_for_a_training_free_reranker(variant):
    model = build_model(ModelConfig(variant=variant, **TINY))
    assert choose(model, "mack") == "mack" and choose(model, "hosa") == "hosa"


@pytest.mark.parametrize("name", ["mack", "hosa"])
def test_a_training_free_score_refines_the_first_stage_and_weight_zero_keeps_its_order(name):
    model = build_model(ModelConfig(variant="clip_finetune", **TINY))
    index = tiny_index(model)
    query = model.text_features(["Velmora Rovers win again."], [""])
    first = index.embeddings["images"] @ model.text_embedding(query).numpy()[0]
    rows = np.zeros(4, dtype=int)
    items = np.arange(4)
    plain = Reranker(model, index, name, k=4, weight=0.0).score_images(query, rows, items, first)
    assert np.allclose(plain, first)  # weight 0: the first stage's scores, so its order
    added = Reranker(model, index, name, k=4, weight=2.0)
    own = added._pair_scores(added.image_features(items), query.select(torch.from_numpy(rows)), True).numpy()
    assert np.allclose(added.score_images(query, rows, items, first), first + 2.0 * own, atol=1e-6)
    assert added.info == {"reranker": name, "rerank_k": 4, "rerank_weight": 2.0}


def test_mack_learns_words_only_from_the_train_splits_labelled_boxes():
    model = build_model(ModelConfig(variant="clip_finetune", **TINY))
    reranker = Reranker(model, tiny_index(model), "mack", k=4)
    assert reranker.prototypes.words == ["rovers", "thipa", "union", "velmora"]  # not kestrel/works: test split
    with pytest.raises(ConfigError, match="needs labelled regions: images of split train"):
        Reranker(model, tiny_index(model, train_boxes=False), "mack", k=4)


def test_mack_refuses_adaptive_patches_that_are_no_grid_to_pool_boxes_in():
    model = build_model(ModelConfig(variant="adamatch", **TINY))
    with pytest.raises(ConfigError, match="variant adamatch keeps adaptive patches instead"):
        Reranker(model, tiny_index(model), "mack", k=4)
    assert Reranker(model, tiny_index(model), "hosa", k=4).name == "hosa"
    from entityclip.config import load_config
    from entityclip.pipeline import run_pipeline

    cfg = load_config(None, ["evaluate.rerankers=[hosa,mack]", "storage.root=/nonexistent/never-written"])
    with pytest.raises(ConfigError, match="variant adamatch keeps adaptive patches"):  # before any stage runs
        run_pipeline(cfg, ["entityclip", "adamatch"], serve_query=False, progress=False)


def test_a_model_that_keeps_no_tokens_is_told_how_to_keep_them():
    model = build_model(ModelConfig(variant="clip_finetune", **TINY))
    index = tiny_index(model)
    index.image_tokens = None
    with pytest.raises(ConfigError, match="set index.image_tokens=true"):
        Reranker(model, index, "hosa", k=4)


@pytest.mark.slow
def test_training_free_rerankers_are_evaluated_and_served_for_a_model_without_a_reranker(trained_run):
    """clip_zeroshot (packaged, never trained) with index.image_tokens: evaluation logs each
    re-ranker's two-stage recall, and the Retriever serves it."""
    from entityclip import storage
    from entityclip.paths import RunPaths
    from entityclip.pipeline import stage_evaluate, stage_index, stage_train, with_variant
    from entityclip.retrieval import Retriever

    cfg = with_variant(trained_run["cfg"], "clip_zeroshot")
    cfg = replace(cfg, index=replace(cfg.index, image_tokens=True),
                  evaluate=replace(cfg.evaluate, rerankers=["mack", "hosa"]))
    stage_train(cfg, progress=False)
    stage_index(cfg)
    metrics = stage_evaluate(cfg)
    for name in ("mack", "hosa"):
        for split in ("test_seen", "test_unseen"):
            assert metrics[f"{name}/{split}"]["rerank_k"] == cfg.serve.rerank_k
            assert 0 <= metrics[f"{name}/{split}"]["rsum"] <= 600
    assert storage.read_json(RunPaths.for_config(cfg).evaluation("clip_zeroshot")).keys() == metrics.keys()
    retriever = Retriever.load(config=cfg, variant="clip_zeroshot", explain=False, rerank="mack")
    answer = retriever.search_text("Velmora Rovers lift the cup.", k=cfg.serve.rerank_k + 1, explanation="")
    assert answer["model"]["reranker"] == "mack"
    rescored = [h["rerank_score"] for h in answer["results"]]
    assert rescored[:-1] == sorted(rescored[:-1], reverse=True) and rescored[-1] is None
