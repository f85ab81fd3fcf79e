"""The bundled synthetic entity benchmark (docs/design.md §4).

A world of fictional entities whose invented names say nothing about how they look. Each has a
knowledge record of visual attributes; images are drawn from those attributes, texts only name
the entities. Test entities are held out of training, so matching them needs knowledge of what
they look like: the explanation stage's job.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw
from tqdm import tqdm

from entityclip import storage
from entityclip.config import DataConfig
from entityclip.data.images import encode_png
from entityclip.data.samples import COMPOSED_SPLIT, COMPOSITIONAL_SPLIT, TRAIN_COMPOSED_SPLIT, samples_table

COLOURS = {
    "red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 210, 40),
    "purple": (140, 50, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "bar"]
# Worlds larger than the first shapes' 192 looks also use these, and tell entities apart by the
# pattern's colour too (appended, so every smaller world stays as it was).
MORE_SHAPES = ["star", "hexagon", "arrow", "chevron"]
PATTERNS = ["solid", "stripes", "dots", "checks"]
SETTINGS = {  # background colour of the scene
    "a grass field": (70, 120, 60), "a grey city street": (120, 120, 125), "a sandy beach": (215, 195, 150),
    "a snowy slope": (225, 230, 240), "a night arena": (25, 30, 70),
}
KINDS = ["football club", "cycling team", "company", "band", "racing team", "festival"]
EVENTS = [
    "lift the cup after a tense final", "announce a surprise merger", "open their new season",
    "draw record crowds on Saturday", "unveil plans for next year", "celebrate a late comeback",
    "face questions from the press", "return home after the tour",
]
CITIES = ["Arlen", "Doveport", "Kestrel Bay", "Marrow Hill", "Ostwick", "Quillon", "Sarn", "Tolvane"]
SYLLABLES = ["vel", "mor", "ra", "tak", "zen", "qui", "lor", "bar", "sha", "nim", "dro", "fex", "ul", "pa", "gor", "thi"]
SUFFIXES = ["Rovers", "United", "Collective", "Works", "Syndicate", "Union", "Riders", "Ensemble"]


@dataclass(frozen=True)
class Entity:
    entity_id: str
    name: str
    kind: str
    primary: str
    secondary: str
    shape: str
    pattern: str
    setting: str


def visible_look(primary: str, shape: str, pattern: str, secondary: str) -> tuple:
    """What an image shows of an entity: a solid emblem hides its secondary colour."""
    return primary, shape, pattern, None if pattern == "solid" else secondary


def make_world(num_entities: int, seed: int) -> list[Entity]:
    """Entities with unique names and unique looks. The first 192 differ in (primary, shape,
    pattern); beyond those, in everything the emblem shows (`visible_look`), up to 1,760."""
    rng = random.Random(seed)
    looks = [(c, s, p) for c in COLOURS for s in SHAPES for p in PATTERNS]
    rng.shuffle(looks)
    names: set[str] = set()
    world: list[Entity] = []
    more_looks: list[tuple] = []
    for i in range(num_entities):
        while True:
            stem = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            name = f"{stem} {rng.choice(SUFFIXES)}"
            if name not in names:
                names.add(name)
                break
        if i < len(looks):
            primary, shape, pattern = looks[i]
            secondary = rng.choice([c for c in COLOURS if c != primary])
        else:
            if i == len(looks):
                more_looks = _unused_looks(world, rng)
            if i - len(looks) >= len(more_looks):
                raise ValueError(f"at most {len(looks) + len(more_looks)} entities have distinct looks")
            primary, shape, pattern, secondary = more_looks[i - len(looks)]
        world.append(Entity(f"e{i:04d}", name, rng.choice(KINDS), primary, secondary, shape, pattern,
                            rng.choice(list(SETTINGS))))
    return world


def _unused_looks(world: list[Entity], rng: random.Random) -> list[tuple[str, str, str, str]]:
    """Every (primary, shape, pattern, secondary) whose visible look no entity of `world` has,
    one per visible look, shuffled."""
    taken = {visible_look(e.primary, e.shape, e.pattern, e.secondary) for e in world}
    free: dict[tuple, tuple] = {}
    for c in COLOURS:
        for s in SHAPES + MORE_SHAPES:
            for p in PATTERNS:
                for sec in (x for x in COLOURS if x != c):
                    key = visible_look(c, s, p, sec)
                    if key not in taken:
                        free.setdefault(key, (c, s, p, sec))
    out = list(free.values())
    rng.shuffle(out)
    return out


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        w = r / 3
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else r / 2.2) * math.sin(math.pi * k / 5),
                 cy - (r if k % 2 == 0 else r / 2.2) * math.cos(math.pi * k / 5)) for k in range(10)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi * k / 3), cy + r * math.sin(math.pi * k / 3)) for k in range(6)]
    if shape == "arrow":  # pointing right
        w = r / 2.5
        return [(cx - r, cy - w), (cx, cy - w), (cx, cy - r), (cx + r, cy), (cx, cy + r), (cx, cy + w), (cx - r, cy + w)]
    if shape == "chevron":  # pointing up
        return [(cx, cy - r), (cx + r, cy + r / 3), (cx + r, cy + r), (cx, cy), (cx - r, cy + r), (cx - r, cy + r / 3)]
    if shape == "bar":
        return [(cx - r, cy - r / 2.5), (cx + r, cy - r / 2.5), (cx + r, cy + r / 2.5), (cx - r, cy + r / 2.5)]
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]  # square


def _emblem(entity: Entity, size: int) -> Image.Image:
    """The entity's emblem on a transparent canvas: shape in primary colour, pattern in secondary."""
    fill = Image.new("RGBA", (size, size), COLOURS[entity.primary] + (255,))
    draw = ImageDraw.Draw(fill)
    sec = COLOURS[entity.secondary] + (255,)
    step = max(size // 5, 2)
    if entity.pattern == "stripes":
        for x in range(0, size, step * 2):
            draw.rectangle([x, 0, x + step - 1, size], fill=sec)
    elif entity.pattern == "dots":
        for y in range(step // 2, size, step * 2):
            for x in range(step // 2, size, step * 2):
                draw.ellipse([x, y, x + step, y + step], fill=sec)
    elif entity.pattern == "checks":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=sec)
    mask = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask)
    r = size / 2 - 1
    if entity.shape == "circle":
        mdraw.ellipse([1, 1, size - 2, size - 2], fill=255)
    else:
        mdraw.polygon(_shape_polygon(entity.shape, size / 2, size / 2, r), fill=255)
    fill.putalpha(mask)
    return fill


def draw_scene(entities: list[Entity], size: int, rng: random.Random) -> tuple[Image.Image, list[list[float]]]:
    """A noisy scene in the first entity's setting with each entity's emblem and distractors;
    with the emblems' boxes ([x0, y0, x1, y1] as fractions of the side)."""
    bg = np.array(SETTINGS[entities[0].setting], dtype=np.float32)
    np_rng = np.random.default_rng(rng.getrandbits(32))
    pixels = np.clip(bg + np_rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):  # grey distractor blobs carry no entity information
        r = rng.uniform(0.05, 0.12) * size
        x, y = rng.uniform(r, size - r), rng.uniform(r, size - r)
        g = rng.randint(90, 170)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(g, g, g))
    boxes = []
    for i, entity in enumerate(entities):
        scale = rng.uniform(0.45, 0.7) if i == 0 else rng.uniform(0.25, 0.35)
        esize = max(int(size * scale), 6)
        x, y = rng.randint(0, size - esize), rng.randint(0, size - esize)
        emblem = _emblem(entity, esize)
        img.paste(emblem, (x, y), emblem)
        boxes.append([x / size, y / size, (x + esize) / size, (y + esize) / size])
    return img, boxes


def draw_layout(entities: list[Entity], placements: list[tuple[float, float, float]], setting: str, size: int,
                seed: int) -> tuple[Image.Image, list[list[float]]]:
    """A scene in `setting` with each entity's emblem at its placement (left, top, side: fractions
    of the image side), with its boxes. Layouts with one `seed` share their background noise: a
    minimal pair differs only where its emblems are."""
    bg = np.array(SETTINGS[setting], dtype=np.float32)
    pixels = np.clip(bg + np.random.default_rng(seed).normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    boxes = []
    for entity, (left, top, side) in zip(entities, placements):
        esize, x, y = max(int(size * side), 6), int(size * left), int(size * top)
        emblem = _emblem(entity, esize)
        img.paste(emblem, (x, y), emblem)
        boxes.append([x / size, y / size, (x + esize) / size, (y + esize) / size])
    return img, boxes


@dataclass
class CompositionalScene:
    name: str  # <kind>-<pair>-<0|1>
    entities: list[Entity]  # in the order of `placements`
    placements: list[tuple[float, float, float]]  # (left, top, side) per entity
    text: str
    setting: str  # shared by the pair
    seed: int  # background noise, shared by the pair


def compositional_scenes(seen: list[Entity], pairs: int, rng: random.Random,
                         exclude: frozenset = frozenset()) -> list[CompositionalScene]:
    """Minimal pairs of scenes, `pairs` of each kind, of two seen entities A and B:
    - relation: A on the left and B on the right, or the other way round;
    - binding: A's emblem large and B's small, or the other way round;
    each pair's two texts the same words in another order, its two images the same background.
    A and B are never a pair of entity ids in `exclude`."""
    if pairs and len(exclude) >= len(seen) * (len(seen) - 1) // 2:
        raise ValueError(f"every pair of the {len(seen)} seen entities is excluded")
    out = []
    for kind in ("relation", "binding"):
        for i in range(pairs):
            a, b = rng.sample(seen, 2)
            while frozenset((a.entity_id, b.entity_id)) in exclude:
                a, b = rng.sample(seen, 2)
            city, seed, top = rng.choice(CITIES), rng.getrandbits(32), rng.uniform(0.1, 0.4)
            if kind == "relation":
                left, right = (0.05, top, 0.4), (0.55, top, 0.4)
                scenes = [([a, b], f"{a.name} on the left and {b.name} on the right in {city}."),
                          ([b, a], f"{b.name} on the left and {a.name} on the right in {city}.")]
                out += [CompositionalScene(f"{kind}-{i:03d}-{j}", pair, [left, right], text, a.setting, seed)
                        for j, (pair, text) in enumerate(scenes)]
            else:
                scenes = [(0.5, 0.25, f"a large {a.name} emblem and a small {b.name} emblem in {city}."),
                          (0.25, 0.5, f"a small {a.name} emblem and a large {b.name} emblem in {city}.")]
                out += [CompositionalScene(f"{kind}-{i:03d}-{j}", [a, b], [(0.02, top, side_a), (0.48, top, side_b)],
                                           text, a.setting, seed)
                        for j, (side_a, side_b, text) in enumerate(scenes)]
    return out


COMPOSED_TEXT = "this emblem, but on {setting}."


def composed_rows(world: list[Entity], unseen: set[str], rows: list[dict], per_entity: int, size: int, root: str,
                  rng: random.Random) -> list[dict]:
    """VISTA-style composed queries, up to `per_entity` per entity, each in another setting: the
    reference is one of the entity's own scenes (a train sample for a seen entity, a test_unseen
    one for an unseen entity), the text names only the new setting ("this emblem, but on a sandy
    beach."), and the target image is the entity's emblem alone in that setting. Seen entities'
    triplets form train_composed; unseen ones' test_composed, where the entity's look can only
    come from the reference image. Texts name no entity (`entities` is empty), so a text alone
    finds the setting, an image alone the entity, and only the two together the target."""
    references: dict[str, list[str]] = {}
    for row in rows:
        if row["split"] in ("train", "test_unseen"):
            references.setdefault(row["sample_id"].rsplit("-", 1)[0], []).append(row["image_uri"])
    out = []
    for entity in world:
        if entity.entity_id not in references:
            continue
        split = COMPOSED_SPLIT if entity.entity_id in unseen else TRAIN_COMPOSED_SPLIT
        others = [s for s in SETTINGS if s != entity.setting]
        for setting in rng.sample(others, min(per_entity, len(others))):
            side = rng.uniform(0.45, 0.7)
            placement = (rng.uniform(0, 1 - side), rng.uniform(0, 1 - side), side)
            image, boxes = draw_layout([entity], [placement], setting, size, rng.getrandbits(32))
            sample_id = f"composed-{entity.entity_id}-{list(SETTINGS).index(setting)}"
            image_uri = storage.join(root, "images", f"{sample_id}.png")
            storage.write_bytes(image_uri, encode_png(image))
            out.append({"sample_id": sample_id, "image_uri": image_uri, "text": COMPOSED_TEXT.format(setting=setting),
                        "entities": [], "split": split, "source": "synthetic", "boxes": boxes,
                        "reference_uri": rng.choice(references[entity.entity_id])})
    return out


def _other(seen: list[Entity], own: int | None, rng: random.Random) -> Entity:
    """A seen entity other than the one at position `own`, drawn as `rng.choice` of the list
    without it would draw (same random numbers, so worlds stay as they were), in O(1)."""
    k = rng.choice(range(len(seen) - (own is not None)))
    return seen[k + 1 if own is not None and k >= own else k]


def caption(entities: list[Entity], rng: random.Random) -> str:
    """A news-style sentence naming the entities and an event, never their looks."""
    names = " and ".join(e.name for e in entities)
    return f"{names} {rng.choice(EVENTS)} in {rng.choice(CITIES)}."


def generate(data_cfg: DataConfig, root: str, progress: bool = True) -> dict[str, str]:
    """Write entities.parquet, samples.parquet and the images under `root`; return their URIs."""
    rng = random.Random(data_cfg.seed)
    world = make_world(data_cfg.num_entities, data_cfg.seed)
    order = list(world)
    rng.shuffle(order)
    n_unseen = max(1, round(data_cfg.num_entities * data_cfg.unseen_entity_fraction))
    unseen = {e.entity_id for e in order[:n_unseen]}
    seen = [e for e in world if e.entity_id not in unseen]

    seen_position = {e.entity_id: k for k, e in enumerate(seen)}
    rows = []
    bar = tqdm(total=data_cfg.num_entities * data_cfg.samples_per_entity, desc="synthetic images", disable=not progress)
    for entity in world:
        n_test_seen = max(1, round(data_cfg.samples_per_entity * data_cfg.seen_test_fraction))
        for j in range(data_cfg.samples_per_entity):
            # A quarter of the scenes also show a second, smaller, *seen* entity.
            in_scene = [entity] + ([_other(seen, seen_position.get(entity.entity_id), rng)]
                                   if len(seen) > (entity.entity_id in seen_position) and rng.random() < 0.25 else [])
            if entity.entity_id in unseen:
                split = "test_unseen"
            else:
                split = "test_seen" if j < n_test_seen else "train"
            sample_id = f"{entity.entity_id}-{j:03d}"
            image_uri = storage.join(root, "images", f"{sample_id}.png")
            image, boxes = draw_scene(in_scene, data_cfg.image_size, rng)
            storage.write_bytes(image_uri, encode_png(image))
            rows.append({
                "sample_id": sample_id, "image_uri": image_uri, "text": caption(in_scene, rng),
                "entities": [e.name for e in in_scene], "split": split, "source": "synthetic", "boxes": boxes,
            })
            bar.update()
    bar.close()
    # Their own random streams: every other split stays as it was without them.
    test_scenes = compositional_scenes(seen, data_cfg.compositional_pairs, random.Random(f"{data_cfg.seed}-compositional")) \
        if data_cfg.compositional_pairs and len(seen) >= 2 else []
    train_scenes = compositional_scenes(seen, data_cfg.compositional_train_pairs,
                                        random.Random(f"{data_cfg.seed}-compositional-train"),
                                        exclude=frozenset(frozenset(e.entity_id for e in s.entities) for s in test_scenes)) \
        if data_cfg.compositional_train_pairs and len(seen) >= 2 else []
    for prefix, split, scenes in (("comp", COMPOSITIONAL_SPLIT, test_scenes), ("comptrain", "train", train_scenes)):
        for scene in scenes:
            sample_id = f"{prefix}-{scene.name}"
            image_uri = storage.join(root, "images", f"{sample_id}.png")
            image, boxes = draw_layout(scene.entities, scene.placements, scene.setting, data_cfg.image_size, scene.seed)
            storage.write_bytes(image_uri, encode_png(image))
            rows.append({"sample_id": sample_id, "image_uri": image_uri, "text": scene.text,
                         "entities": [e.name for e in scene.entities], "split": split, "source": "synthetic",
                         "boxes": boxes})
    if data_cfg.composed_per_entity:  # its own random stream too
        rows += composed_rows(world, unseen, rows, data_cfg.composed_per_entity, data_cfg.image_size, root,
                              random.Random(f"{data_cfg.seed}-composed"))
    entities_uri = storage.join(root, "entities.parquet")
    samples_uri = storage.join(root, "samples.parquet")
    storage.write_parquet(entities_uri, pa.Table.from_pylist([asdict(e) for e in world]))
    storage.write_parquet(samples_uri, samples_table(rows))
    return {"entities": entities_uri, "samples": samples_uri}
