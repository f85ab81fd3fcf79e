"""MACK (Huang et al., NeurIPS 2022: "Multimodal Aligned Conceptual Knowledge for Unpaired
Image-text Matching"), training-free: knowledge of what words look like, gathered without
image-caption pairs, scores a pair through the words of its text.

1. Words with their image regions: every region a labelled source grounds to a word. Here the
   train split's object boxes, each labelled with its entity, whose name's words it grounds
   ("Velmora Rovers" -> velmora, rovers); the paper uses a detector's labelled regions. No
   caption is read: the entity labels of boxes are the only link between words and pixels.
2. A prototype per word: the mean feature of its regions (each region the mean of the image
   patch tokens inside its box), which evens out how differently one concept appears.
3. A pair's score: for each word of the text that has a prototype, how well the image's best
   patch matches it (cosine) above how well it matches the labelled images' best patches on
   average (its baseline), averaged over those words; 0 for a text with no known word. Without
   the baseline every known word adds a positive score, and in image-to-text search a text
   naming any known entity would climb over a correct text whose entity is unknown (measured:
   unseen rsum 275.7 -> 250.0 on the default world); with it a known word the image does not
   show counts against the pair, and unknown words stay neutral.
4. Optionally (`refine`), prototypes fine-tuned with region-level cycle consistency on regions
   alone: region -> nearest prototype -> back to the region must return where it started.

As a re-ranker (rerank.py) the score is added to the first stage's similarity, so any matcher
whose index keeps image tokens can use it, and a query naming no known word keeps the first
stage's order. Words never seen in a labelled region (entities held out of training) have no
prototype: MACK has nothing to say about them, by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entityclip.models.perturbation import box_masks, box_tensor

WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The lower-cased words of a text, in order."""
    return WORD.findall(text.lower())


@dataclass
class WordPrototypes:
    words: list[str]
    vectors: torch.Tensor  # [V, D] unit-norm, row i the prototype of words[i]
    baselines: torch.Tensor  # [V] each prototype's mean best-patch cosine over the labelled images

    def __post_init__(self):
        self._row = {w: i for i, w in enumerate(self.words)}

    def rows(self, text: str) -> list[int]:
        """Rows of the prototypes of the text's known words, each once."""
        return sorted({self._row[w] for w in words(text) if w in self._row})


def region_features(patches: torch.Tensor, boxes: list) -> torch.Tensor:
    """[n, D]: per box, the mean of the patch tokens [P, D] whose centres lie in it; a box that
    covers no patch centre is skipped."""
    masks = box_masks(box_tensor(boxes), patches.shape[0])
    out = [patches[mask].mean(dim=0) for mask in masks if mask.any()]
    return torch.stack(out) if out else patches.new_zeros((0, patches.shape[1]))


def build_prototypes(patches: torch.Tensor, entities: list[list[str]], boxes: list[list]) -> WordPrototypes:
    """Prototypes from labelled regions: patches [N, P, D] of N images, each image's entity names
    and its boxes in the same order (box j shows entity j)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for image_patches, names, image_boxes in zip(patches, entities, boxes):
        for name, box in zip(names, image_boxes):
            region = region_features(image_patches.float(), [box])
            if not len(region):
                continue
            for word in set(words(name)):
                sums[word] = sums.get(word, 0) + region[0]
                counts[word] = counts.get(word, 0) + 1
    vocabulary = sorted(sums)
    if not vocabulary:
        return WordPrototypes([], patches.new_zeros((0, patches.shape[-1])).float(), torch.zeros(0))
    vectors = F.normalize(torch.stack([sums[w] / counts[w] for w in vocabulary]), dim=-1)
    return WordPrototypes(vocabulary, vectors, baselines(vectors, patches))


BASELINE_IMAGES = 2000  # labelled images a baseline averages over, at most (evenly spaced)


def baselines(vectors: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """[V] each prototype's best-patch cosine, averaged over images [N, P, D]."""
    step = max(1, len(patches) // BASELINE_IMAGES)
    unit = F.normalize(patches[::step].float(), dim=-1)
    return torch.stack([best_matches(vectors, image) for image in unit]).mean(dim=0)


def best_matches(vectors: torch.Tensor, unit_patches: torch.Tensor) -> torch.Tensor:
    """[V] each prototype's cosine with its best-matching patch of one image [P, D] (unit rows)."""
    return (vectors @ unit_patches.T).max(dim=1).values


def pair_scores(prototypes: WordPrototypes, patches: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """[B] MACK scores of aligned pairs: image patch tokens [B, P, D] and texts."""
    unit = F.normalize(patches.float(), dim=-1)
    out = torch.zeros(len(texts))
    for b, text in enumerate(texts):
        rows = prototypes.rows(text)
        if rows:
            out[b] = (best_matches(prototypes.vectors[rows], unit[b]) - prototypes.baselines[rows]).mean()
    return out


def refine(prototypes: WordPrototypes, regions: torch.Tensor, labelled: torch.Tensor, steps: int = 100,
           lr: float = 0.01, temperature: float = 0.05) -> WordPrototypes:
    """Prototypes fine-tuned by region-level cycle consistency on unlabelled regions [n, D]: each
    region attends softly over the prototypes, the attended prototype attends back over the
    regions, and the loss asks the cycle to return to the region it started from. No pairs, no
    labels; the prototypes move toward the regions that choose them. Their baselines are
    measured again on the labelled images' patches [N, P, D]."""
    if not len(prototypes.words) or len(regions) < 2:
        return prototypes
    unit = F.normalize(regions.float(), dim=-1)
    vectors = prototypes.vectors.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=lr)
    target = torch.arange(len(unit))
    for _ in range(steps):
        p = F.normalize(vectors, dim=-1)
        to_word = (unit @ p.T / temperature).softmax(dim=1)  # [n, V]
        back = F.normalize(to_word @ p, dim=-1) @ unit.T / temperature  # [n, n]
        loss = F.cross_entropy(back, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vectors = F.normalize(vectors.detach(), dim=-1)
    return WordPrototypes(prototypes.words, vectors, baselines(vectors, labelled))
