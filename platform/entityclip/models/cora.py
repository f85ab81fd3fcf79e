"""CORA's text side (CVPR 2024, "Composing Object Relations and Attributes for Image-Text
Matching"): the caption's scene graph (data/scene_graph.py) embedded by a graph attention
network over the text tower's token features.

Each node starts as the mean of its words' token features: objects (entity names), attributes
("large") and relation phrases ("on the left"). Messages are typed by edge, so direction is
kept: an attribute or a relation modifies its head object (`MODIFIES`), the head informs its
modifiers (`HEAD`), a relation node also reads the object it relates to (`RELATED`), and
objects of one caption read each other (`CO_MENTION`). Each layer adds the attention-weighted
messages to the node (its output projection starts at zero, so an untrained graph passes the
words' features through). The caption's embedding is its plain EOT embedding plus the mean of its
object nodes; training adds an object-level contrastive loss between object nodes and the image
regions of the entities they name (train/objective.py).

The graph reaches the model as `SceneGraphs`, arrays built by `scene_graph_arrays` from the raw
texts (the tokenizer lower-cases, so names are found before it runs): in Ray Data for training,
in `EntityCLIP.text_features` for everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.tokenizer import basic_clean, whitespace_clean
from torch import nn

from entityclip.data.samples import stable_id
from entityclip.data.scene_graph import parse_scene_graph
from entityclip.models.backbone import word_positions
from entityclip.models.perturbation import box_masks, patch_centres

NO_EDGE, SELF, MODIFIES, HEAD, RELATED, CO_MENTION = -1, 0, 1, 2, 3, 4
EDGE_TYPES = 5


@dataclass
class SceneGraphs:
    """A batch of scene graphs of at most N nodes over texts of L tokens."""
    nodes: torch.Tensor  # [B, N, L] float: each node's weights over the text's tokens (its words' mean)
    edges: torch.Tensor  # [B, N, N] int64: the type of the message node j sends node i (NO_EDGE: none)
    objects: torch.Tensor  # [B, N] bool: object nodes
    boxes: torch.Tensor  # [B, N, 4] float: an object's region in the image, where known
    has_box: torch.Tensor  # [B, N] bool
    object_ids: torch.Tensor  # [B, N] int64: a stable hash of an object's name (the same entity, the same id)

    @classmethod
    def from_arrays(cls, arrays: dict, device=None) -> "SceneGraphs":
        """From `scene_graph_arrays`' output or a training batch holding it (numpy or tensors)."""
        return cls(*(torch.as_tensor(arrays[f"graph_{f.name}"], device=device) for f in fields(cls)))

    def select(self, index: torch.Tensor) -> "SceneGraphs":
        return SceneGraphs(*(getattr(self, f.name)[index] for f in fields(self)))


def caption_words(tokenizer, text: str) -> list[str]:
    """The words the tokenizer makes of `text`, in its order but with their case kept."""
    return tokenizer.pat.findall(whitespace_clean(basic_clean(text)))


def scene_graph_arrays(tokenizer, texts: list[str], ids: np.ndarray | torch.Tensor, max_nodes: int,
                       entities: list | None = None, boxes: list | None = None) -> dict[str, np.ndarray]:
    """`SceneGraphs` fields (as `graph_<field>` numpy arrays) of tokenized `texts` ([B, L] ids).
    Nodes are objects, then attributes, then relations, at most `max_nodes`; an object whose
    name is one of the row's `entities` gets that entity's box from `boxes`."""
    ids = torch.as_tensor(np.asarray(ids))
    b, length = ids.shape
    out = {"graph_nodes": np.zeros((b, max_nodes, length), np.float32),
           "graph_edges": np.full((b, max_nodes, max_nodes), NO_EDGE, np.int64),
           "graph_objects": np.zeros((b, max_nodes), bool), "graph_boxes": np.zeros((b, max_nodes, 4), np.float32),
           "graph_has_box": np.zeros((b, max_nodes), bool), "graph_object_ids": np.zeros((b, max_nodes), np.int64)}
    for row, text in enumerate(texts):
        words = caption_words(tokenizer, text)
        positions = [p for _, p in word_positions(tokenizer, ids[row], int(ids[row].argmax()))]
        words = words[:len(positions)]  # words past the context length were cut
        graph = parse_scene_graph(words)
        box_of = dict(zip(entities[row], boxes[row])) if entities is not None and boxes is not None else {}
        nodes: list[tuple[int, ...]] = []  # each node's word indices
        head: dict[int, int] = {}  # modifier node -> its object node
        related: dict[int, int] = {}  # relation node -> the object it relates its head to
        n_objects = min(len(graph.objects), max_nodes)
        for k in range(n_objects):
            nodes.append(graph.objects[k])
            name = graph.object_name(words, k)
            out["graph_objects"][row, k] = True
            out["graph_object_ids"][row, k] = stable_id(name)
            if name in box_of:
                out["graph_boxes"][row, k], out["graph_has_box"][row, k] = box_of[name], True
        for word, k in graph.attributes:
            if k < n_objects and len(nodes) < max_nodes:
                head[len(nodes)] = k
                nodes.append((word,))
        for subject, phrase, other in graph.relations:
            if subject < n_objects and other < n_objects and len(nodes) < max_nodes:
                head[len(nodes)], related[len(nodes)] = subject, other
                nodes.append(phrase)
        edges = out["graph_edges"][row]
        for i, words_of_node in enumerate(nodes):
            token_positions = [p for w in words_of_node for p in positions[w]]
            out["graph_nodes"][row, i, token_positions] = 1.0 / len(token_positions)
            edges[i, i] = SELF
        for i in range(n_objects):
            for j in range(n_objects):
                if i != j:
                    edges[i, j] = CO_MENTION
        for modifier, obj in head.items():
            edges[obj, modifier], edges[modifier, obj] = MODIFIES, HEAD
        for relation, obj in related.items():
            edges[relation, obj] = RELATED
    return out


class GraphAttentionLayer(nn.Module):
    """Relational graph attention: node i attends over the nodes that send it a message, with
    keys and values from one projection per edge type."""

    def __init__(self, dim: int, edge_types: int = EDGE_TYPES):
        super().__init__()
        self.edge_types = edge_types
        self.query = nn.Linear(dim, dim)
        self.keys = nn.Linear(dim, dim * edge_types)
        self.values = nn.Linear(dim, dim * edge_types)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        connected = edges >= 0
        kind = F.one_hot(edges.clamp(min=0), self.edge_types).to(h.dtype) * connected.unsqueeze(-1)  # [B, N, N, T]
        keys = torch.einsum("bijt,bjtd->bijd", kind, self.keys(h).view(b, n, self.edge_types, d))
        values = torch.einsum("bijt,bjtd->bijd", kind, self.values(h).view(b, n, self.edge_types, d))
        scores = (self.query(h).unsqueeze(2) * keys).sum(-1) / math.sqrt(d)
        # A padding node has no edge at all: it attends to nothing and receives nothing.
        weights = scores.masked_fill(~connected, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        return h + self.out(self.norm(torch.einsum("bij,bijd->bid", weights, values)))


class SceneGraphEncoder(nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(GraphAttentionLayer(dim) for _ in range(layers))

    def forward(self, tokens: torch.Tensor, graphs: SceneGraphs) -> torch.Tensor:
        """[B, N, D] node features after the graph attention layers (zeros at padding nodes)."""
        h = graphs.nodes.to(tokens.dtype) @ tokens
        for layer in self.layers:
            h = layer(h, graphs.edges)
        return h * (graphs.edges.diagonal(dim1=1, dim2=2) >= 0).unsqueeze(-1)


def object_mean(nodes: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """[B, D] the mean of each caption's object nodes (zeros for a caption without objects)."""
    weights = objects.to(nodes.dtype)
    return (weights.unsqueeze(-1) * nodes).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)


def region_features(patches: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """[O, D] the mean of the patch tokens [O, P, D] whose centres lie in each box [O, 4]
    (fractions of the side); a box too small to hold a centre takes the patch nearest its own."""
    inside = box_masks(boxes, patches.shape[1])  # [O, P]
    centres = patch_centres(patches.shape[1]).to(patches.device)
    box_centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)
    nearest = torch.cdist(box_centre, centres).argmin(dim=1)
    inside[torch.arange(len(boxes), device=boxes.device), nearest] |= ~inside.any(dim=1)
    weights = inside.to(patches.dtype)
    return (weights.unsqueeze(-1) * patches).sum(1) / weights.sum(1, keepdim=True)


def object_region_loss(nodes: torch.Tensor, graphs: SceneGraphs, patches: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """CORA's object-level contrastive loss: each object node whose entity's box is known
    against that entity's image region ([B, P, D] patch tokens pooled in the box), InfoNCE both
    ways over this worker's objects; objects of one entity are each other's positives. Zero for
    a batch without such objects."""
    rows, slots = graphs.has_box.nonzero(as_tuple=True)
    if len(rows) == 0:
        return nodes.sum() * 0.0
    objects = F.normalize(nodes[rows, slots].float(), dim=-1)
    regions = F.normalize(region_features(patches[rows].float(), graphs.boxes[rows, slots].float()), dim=-1)
    ids = graphs.object_ids[rows, slots]
    same = (ids[:, None] == ids[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    logits = scale * objects @ regions.T
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
