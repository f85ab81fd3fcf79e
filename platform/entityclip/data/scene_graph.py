"""A rule-based scene-graph parser for captions (CORA's text side, CVPR 2024: objects, their
attributes and the relations between them), written for the synthetic world's grammar and for
news captions that name their entities with capitalised words.

    words = ["a", "large", "Velmora", "Rovers", "emblem", "and", "a", "small", "Thipa", ...]
    graph = parse_scene_graph(words)

Rules, on the caption's words as the text tower's tokenizer splits them (`caption_words` in
models/cora.py), case kept:
- an object is a run of capitalised words (an entity's name), unless a place word ("in",
  "at", ...) comes just before it ("... in Kestrel Bay");
- an attribute is a size word ("large", "small", ...) just before an object, a determiner
  between them allowed: "a large Velmora Rovers emblem";
- a relation is a spatial phrase ("on the left", "above", ...) just after an object: its
  subject is that object, its object the nearest other object of the caption. "A on the left
  and B on the right" gives left(A, B) and right(B, A); the swapped caption gives left(B, A)
  and right(A, B), a different graph from the same words.
Anything else (events, places) stays in the caption's own embedding, not in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACE_WORDS = {"in", "at", "from", "near", "to"}
DETERMINERS = {"a", "an", "the"}
ATTRIBUTE_WORDS = {"large", "small", "big", "little", "tall", "short"}
RELATION_PHRASES = [("on", "the", "left"), ("on", "the", "right"), ("above",), ("below",), ("beside",),
                    ("next", "to"), ("behind",), ("in", "front", "of")]


@dataclass(frozen=True)
class SceneGraph:
    objects: tuple[tuple[int, ...], ...]  # each object's word indices
    attributes: tuple[tuple[int, int], ...]  # (word index, index of the object it describes)
    relations: tuple[tuple[int, tuple[int, ...], int], ...]  # (subject object, phrase word indices, object object)

    def object_name(self, words: list[str], i: int) -> str:
        return " ".join(words[w] for w in self.objects[i])


def _capitalised(word: str) -> bool:
    return word[:1].isupper() and word.isalpha() and word.lower() not in DETERMINERS


def _objects(words: list[str]) -> list[tuple[int, ...]]:
    objects, run = [], []
    for i, word in enumerate(words + [""]):
        if _capitalised(word):
            run.append(i)
            continue
        if run and (run[0] == 0 or words[run[0] - 1].lower() not in PLACE_WORDS):
            objects.append(tuple(run))
        run = []
    return objects


def _phrase_at(words: list[str], start: int) -> tuple[int, ...] | None:
    lower = [w.lower() for w in words]
    for phrase in RELATION_PHRASES:
        if tuple(lower[start:start + len(phrase)]) == phrase:
            return tuple(range(start, start + len(phrase)))
    return None


def parse_scene_graph(words: list[str]) -> SceneGraph:
    objects = _objects(words)
    attributes, relations = [], []
    for k, span in enumerate(objects):
        before = span[0] - 1
        while before >= 0 and words[before].lower() in DETERMINERS:
            before -= 1
        if before >= 0 and words[before].lower() in ATTRIBUTE_WORDS:
            attributes.append((before, k))
        phrase = _phrase_at(words, span[-1] + 1)
        others = [j for j in range(len(objects)) if j != k]
        if phrase and others:
            nearest = min(others, key=lambda j: abs(objects[j][0] - span[0]))
            relations.append((k, phrase, nearest))
    return SceneGraph(tuple(objects), tuple(attributes), tuple(relations))
