"""CORA: the caption's scene graph (rule-based parser), its graph attention encoder, and the
object-level loss that ties object nodes to the regions of the entities they name."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from entityclip.config import ModelConfig, TrainConfig
from entityclip.data.scene_graph import parse_scene_graph
from entityclip.models import build_model
from entityclip.models.cora import (CO_MENTION, HEAD, MODIFIES, NO_EDGE, RELATED, SELF, SceneGraphEncoder, SceneGraphs,
                                    caption_words, object_region_loss, region_features, scene_graph_arrays)
from entityclip.train.objective import Objective

TOKENIZER = SimpleTokenizer(context_length=32)
LEFT_RIGHT = "Velmora Rovers on the left and Thipa Syndicate on the right in Kestrel Bay."
RIGHT_LEFT = "Thipa Syndicate on the left and Velmora Rovers on the right in Kestrel Bay."


def graph_of(text: str):
    words = caption_words(TOKENIZER, text)
    graph = parse_scene_graph(words)
    return words, graph


def test_entities_are_objects_and_places_are_not():
    words, graph = graph_of("Velmora Rovers and Thipa Syndicate lift the cup in Kestrel Bay.")
    assert [graph.object_name(words, k) for k in range(len(graph.objects))] == ["Velmora Rovers", "Thipa Syndicate"]
    assert graph.attributes == () and graph.relations == ()


def test_a_size_word_before_a_name_is_that_objects_attribute():
    words, graph = graph_of("a large Velmora Rovers emblem and a small Thipa Syndicate emblem in Arlen.")
    assert [(words[w], graph.object_name(words, k)) for w, k in graph.attributes] == [
        ("large", "Velmora Rovers"), ("small", "Thipa Syndicate")]


def test_a_spatial_phrase_after_a_name_relates_it_to_the_other_object_in_its_own_direction():
    def relations(text):
        words, graph = graph_of(text)
        return {(graph.object_name(words, s), " ".join(words[w] for w in phrase), graph.object_name(words, o))
                for s, phrase, o in graph.relations}

    assert relations(LEFT_RIGHT) == {("Velmora Rovers", "on the left", "Thipa Syndicate"),
                                     ("Thipa Syndicate", "on the right", "Velmora Rovers")}
    # The same words in another order: a different graph, where a bag of words sees none.
    assert relations(RIGHT_LEFT) == {("Thipa Syndicate", "on the left", "Velmora Rovers"),
                                     ("Velmora Rovers", "on the right", "Thipa Syndicate")}


def test_a_text_that_names_nothing_has_an_empty_graph():
    _, graph = graph_of("this emblem, but on a sandy beach.")
    assert graph.objects == graph.attributes == graph.relations == ()


def test_graph_arrays_give_each_node_its_words_tokens_typed_edges_and_its_entitys_box():
    ids = TOKENIZER([LEFT_RIGHT])
    arrays = scene_graph_arrays(TOKENIZER, [LEFT_RIGHT], ids, max_nodes=6, entities=[["Thipa Syndicate"]],
                                boxes=[[[0.5, 0.1, 0.9, 0.5]]])
    graphs = SceneGraphs.from_arrays(arrays)
    # Nodes: Velmora Rovers, Thipa Syndicate, "on the left" (of Velmora), "on the right" (of Thipa).
    assert graphs.objects[0].tolist() == [True, True, False, False, False, False]
    nodes = graphs.nodes[0]
    assert torch.allclose(nodes.sum(dim=1), torch.tensor([1.0, 1, 1, 1, 0, 0]))  # a mean over each node's tokens
    words = caption_words(TOKENIZER, LEFT_RIGHT)
    expected = TOKENIZER([" ".join(words[:2])])[0]  # "velmora rovers": its tokens carry node 0's weight
    assert set(ids[0][nodes[0] > 0].tolist()) == set(expected[1:int(expected.argmax())].tolist())
    edges = graphs.edges[0]
    assert edges[0].tolist() == [SELF, CO_MENTION, MODIFIES, NO_EDGE, NO_EDGE, NO_EDGE]
    assert edges[2].tolist() == [HEAD, RELATED, SELF, NO_EDGE, NO_EDGE, NO_EDGE]  # left: reads its subject and its object
    assert edges[3].tolist() == [RELATED, HEAD, NO_EDGE, SELF, NO_EDGE, NO_EDGE]
    assert (edges[4:] == NO_EDGE).all()
    assert graphs.has_box[0].tolist() == [False, True, False, False, False, False]
    assert graphs.boxes[0, 1].tolist() == pytest.approx([0.5, 0.1, 0.9, 0.5])
    # At most max_nodes: objects first, then attributes and relations while room is left.
    small = SceneGraphs.from_arrays(scene_graph_arrays(TOKENIZER, [LEFT_RIGHT], ids, max_nodes=3))
    assert small.objects[0].tolist() == [True, True, False] and small.edges[0, 2, 0] == HEAD


def test_the_graph_tells_apart_what_a_bag_of_words_cannot():
    """Token features that ignore position (a bag of words): the two captions' mean word
    features are equal, yet the graph gives Velmora Rovers a different node in each, since the
    phrase it reads is "on the left" in one and "on the right" in the other."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(49408, 16)
    encoder = SceneGraphEncoder(16, layers=2)
    for layer in encoder.layers:  # as if trained: the output projection no longer zero
        torch.nn.init.normal_(layer.out.weight, std=0.3)
    ids = TOKENIZER([LEFT_RIGHT, RIGHT_LEFT])
    with torch.no_grad():
        tokens = embedding(ids)
        graphs = SceneGraphs.from_arrays(scene_graph_arrays(TOKENIZER, [LEFT_RIGHT, RIGHT_LEFT], ids, 8))
        words_mean = [tokens[i, 1:int(ids[i].argmax())].mean(0) for i in range(2)]
        assert torch.allclose(*words_mean, atol=1e-6)
        nodes = encoder(tokens, graphs)
    velmora = (0, 1)  # Velmora Rovers is object 0 of the first caption, object 1 of the second
    assert not torch.allclose(nodes[0, velmora[0]], nodes[1, velmora[1]], atol=1e-3)


def test_an_untrained_graph_passes_each_nodes_words_through():
    torch.manual_seed(0)
    encoder = SceneGraphEncoder(16, layers=2)
    ids = TOKENIZER([LEFT_RIGHT])
    tokens = torch.randn(1, 32, 16)
    graphs = SceneGraphs.from_arrays(scene_graph_arrays(TOKENIZER, [LEFT_RIGHT], ids, 6))
    with torch.no_grad():
        assert torch.allclose(encoder(tokens, graphs), graphs.nodes @ tokens, atol=1e-6)


def test_a_region_is_the_mean_of_the_patches_whose_centres_its_box_holds():
    patches = torch.arange(4, dtype=torch.float32).view(1, 4, 1).expand(2, 4, 3)  # a 2x2 grid, patch k = k
    regions = region_features(patches, torch.tensor([[0.0, 0.0, 0.5, 1.0],   # the left column: patches 0 and 2
                                                     [0.6, 0.6, 0.7, 0.7]]))  # holds no centre: the nearest, 3
    assert regions[:, 0].tolist() == [1.0, 3.0]


def test_the_object_loss_is_lowest_when_each_object_node_lies_on_its_entitys_region():
    ids = TOKENIZER([LEFT_RIGHT])
    graphs = SceneGraphs.from_arrays(scene_graph_arrays(
        TOKENIZER, [LEFT_RIGHT], ids, 4, entities=[["Velmora Rovers", "Thipa Syndicate"]],
        boxes=[[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]]))
    left, right = F.normalize(torch.tensor([1.0, 0.0]), dim=0), F.normalize(torch.tensor([0.0, 1.0]), dim=0)
    patches = torch.stack([left, right, left, right]).unsqueeze(0)  # 2x2 grid: the left column shows one entity
    aligned = torch.zeros(1, 4, 2)
    aligned[0, 0], aligned[0, 1] = left, right
    swapped = aligned[:, [1, 0, 2, 3]]
    scale = torch.tensor(10.0)
    assert object_region_loss(aligned, graphs, patches, scale) < object_region_loss(swapped, graphs, patches, scale)
    nothing = SceneGraphs.from_arrays(scene_graph_arrays(TOKENIZER, [LEFT_RIGHT], ids, 4))  # no boxes known
    assert object_region_loss(aligned, nothing, patches, scale).item() == 0.0


def test_cora_trains_its_graph_with_the_caption_and_object_losses():
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="cora", image_size=32, patch_size=8, width=32, embed_dim=32, layers=1,
                                    heads=2, context_length=32))
    texts = [LEFT_RIGHT, "Thipa Syndicate lift the cup in Arlen.", "a large Velmora Rovers emblem in Sarn."]
    entities = [["Velmora Rovers", "Thipa Syndicate"], ["Thipa Syndicate"], ["Velmora Rovers"]]
    boxes = [[[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5]], [[0, 0, 1, 1]], [[0.2, 0.2, 0.8, 0.8]]]
    ids = model.tokenize(texts)
    graphs = SceneGraphs.from_arrays(scene_graph_arrays(model.tokenizer, texts, ids, 8, entities, boxes))
    losses = Objective(model, TrainConfig())(torch.randn(3, 3, 32, 32), ids, None, graphs=graphs)
    assert losses["loss_caption"] > 0 and losses["loss_objects"] > 0
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.graph_encoder.layers[-1].out.parameters())
    # Inference builds the graphs from the raw texts: the same embedding.
    with torch.no_grad():
        assert torch.allclose(model.embed_texts(texts), model.text_embedding(model.encode_texts(ids, None, graphs)),
                              atol=1e-6)
    with pytest.raises(ValueError, match="scene graph"):
        model.encode_texts(ids)


def test_preprocess_gives_cora_each_texts_graph_with_the_boxes_of_the_entities_it_names():
    from entityclip.data.images import encode_png
    from entityclip.train.ingest import preprocess

    from PIL import Image

    png = encode_png(Image.new("RGB", (16, 16)))
    batch = {"sample_id": np.array(["a", "b"]), "image": np.array([png, png], dtype=object),
             "text": np.array([LEFT_RIGHT, "this emblem, but on a sandy beach."]),
             "entities": np.array([np.array(["Velmora Rovers", "Thipa Syndicate"]), np.array([])], dtype=object),
             "boxes": np.array([np.array([np.array([0, 0, .5, .5]), np.array([.5, .5, 1, 1])]), np.array([])], dtype=object)}
    rows = preprocess(batch, image_size=16, context_length=32, masking=False, with_explanations=False,
                      scene_graph_nodes=6)
    assert rows["graph_objects"].sum(axis=1).tolist() == [2, 0]
    assert rows["graph_has_box"][0, :2].all() and rows["graph_boxes"][0, 1].tolist() == [0.5, 0.5, 1.0, 1.0]
