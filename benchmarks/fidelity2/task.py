"""The study's task: scenes of five small objects in a 3 x 3 grid, questions that name an object.

Every scene holds 5 objects in 5 of the 9 cells, each of a distinct color. One shape (the
"counted" shape) appears 1-3 times, uniformly; the other objects have distinct other shapes.
So every color names one object, and every shape but a repeated counted one does too.

Two question splits, answered with one word:
  object    "What color is the star?"              -> red     (a shape that occurs once)
            "What shape is the red object?"        -> star
            "How many stars are there?"            -> two     (the counted shape: one/two/three)
  location  "What color is the object in the top-left cell?"  -> red
            "What shape is in the top-left cell?"            -> star

Answers are uniform over 6 colors, 6 shapes or 3 counts by construction, so an image-blind
guess scores about 1/6 (1/3 on counts). `region_patches` gives the patches of the objects a
question is about (the asked object; every counted object for a count): a small share of the
image. Pure Python + Pillow + numpy; deterministic for a seed.
"""
from __future__ import annotations

import collections
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Sequence, Tuple

import numpy as np

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COUNTS = ("one", "two", "three")
CELLS = ("top-left", "top-center", "top-right", "middle-left", "center", "middle-right",
         "bottom-left", "bottom-center", "bottom-right")
QUESTION_TYPES = {"object": ("color_of_shape", "shape_of_color", "count"),
                  "location": ("color_in_cell", "shape_in_cell")}
N_OBJECTS = 5
BACKGROUND = (245, 245, 245)


def random_scene(rng: random.Random, size: int) -> dict:
    counted = rng.choice(SHAPES)
    n = rng.randint(1, 3)
    others = rng.sample([s for s in SHAPES if s != counted], N_OBJECTS - n)
    shapes = [counted] * n + others
    rng.shuffle(shapes)
    colors = rng.sample(sorted(COLORS), N_OBJECTS)
    cells = rng.sample(range(9), N_OBJECTS)
    side = size / 3.0
    objects = []
    for shape, color, cell in zip(shapes, colors, cells):
        row, col = divmod(cell, 3)
        r = rng.uniform(0.2, 0.3) * side
        margin = r + 0.05 * side
        objects.append({"shape": shape, "color": color, "cell": cell, "radius": r,
                        "center": (col * side + rng.uniform(margin, side - margin),
                                   row * side + rng.uniform(margin, side - margin))})
    return {"size": size, "counted": counted, "objects": objects}


def _outline(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    import math

    if shape == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        a, b = 0.33 * r, r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.sin(i * math.pi / 5),
                 cy - (r if i % 2 == 0 else 0.45 * r) * math.cos(i * math.pi / 5)) for i in range(10)]
    raise ValueError(shape)


def draw(scene: dict, labels: bool = False):
    """The RGB image, or (labels=True) an "L" image holding each object's index + 1 (0: background)."""
    from PIL import Image, ImageDraw

    size = scene["size"]
    image = Image.new("L" if labels else "RGB", (size, size), 0 if labels else BACKGROUND)
    pen = ImageDraw.Draw(image)
    for index, obj in enumerate(scene["objects"]):
        fill = index + 1 if labels else COLORS[obj["color"]]
        (cx, cy), r = obj["center"], obj["radius"]
        if obj["shape"] == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pen.polygon(_outline(obj["shape"], cx, cy, r), fill=fill)
    return image


def patch_labels(scene: dict, patch: int) -> np.ndarray:
    """Per patch (row-major), the index + 1 of the object covering most of it (>= 25 %), else 0."""
    grid = scene["size"] // patch
    ids = np.asarray(draw(scene, labels=True))[:grid * patch, :grid * patch]
    blocks = ids.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(blocks == k).sum(1) for k in range(N_OBJECTS + 1)], 1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    return np.where(counts.max(1) >= 0.25 * patch * patch, best, 0)


def region_patches(scene: dict, info: dict, patch: int) -> List[int]:
    """Patches (row-major) that overlap the bounding box of an object the question is about
    (a box, so for a star or a triangle it includes some background)."""
    grid = scene["size"] // patch
    out = set()
    for index in info["objects"]:
        (cx, cy), r = scene["objects"][index]["center"], scene["objects"][index]["radius"]
        rows = range(max(0, int((cy - r) // patch)), min(grid, int((cy + r) // patch) + 1))
        cols = range(max(0, int((cx - r) // patch)), min(grid, int((cx + r) // patch) + 1))
        out.update(i * grid + j for i in rows for j in cols)
    return sorted(out)


def question(rng: random.Random, scene: dict, qtype: str) -> Tuple[str, str, dict]:
    objs = scene["objects"]
    counted = [i for i, o in enumerate(objs) if o["shape"] == scene["counted"]]
    unique = [i for i, o in enumerate(objs) if sum(p["shape"] == o["shape"] for p in objs) == 1]
    if qtype == "count":
        q, a, asked = f"How many {scene['counted']}s are there?", COUNTS[len(counted) - 1], counted
    else:
        i = rng.choice(unique if qtype == "color_of_shape" else range(len(objs)))
        o, asked = objs[i], [i]
        q, a = {"color_of_shape": (f"What color is the {o['shape']}?", o["color"]),
                "shape_of_color": (f"What shape is the {o['color']} object?", o["shape"]),
                "color_in_cell": (f"What color is the object in the {CELLS[o['cell']]} cell?", o["color"]),
                "shape_in_cell": (f"What shape is in the {CELLS[o['cell']]} cell?", o["shape"])}[qtype]
    split = next(s for s, types in QUESTION_TYPES.items() if qtype in types)
    return q, a, {"type": qtype, "split": split, "objects": asked}


def caption(scene: dict) -> str:
    return "; ".join(f"a {o['color']} {o['shape']} in the {CELLS[o['cell']]} cell"
                     for o in sorted(scene["objects"], key=lambda o: o["cell"])) + "."


ANSWERS = tuple(COLORS) + SHAPES + COUNTS


def read_answer(text: str) -> str:
    """The answer word a generation starts with ("" if none). The model is never trained to stop
    (upstream's `chatml_direct` masking never makes the closing `<|im_end|>` a target), so an
    answer may run on into other text, even without a space ("greenfirehose"): the longest
    answer word that the output starts with is the answer."""
    head = text.strip().lower()
    return max((a for a in ANSWERS if head.startswith(a)), key=len, default="")


def _render(job):
    scene, path = job
    draw(scene).save(path)


def _record(rid: str, image: str, turns: Sequence[Tuple[str, str]], **extra) -> dict:
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": rid, "image": image, "conversations": conv, **extra}


def build(root: str, *, size: int, n_train: int, n_test: int, turns: int, seed: int, workers: int = 1) -> dict:
    """Write images and upstream LLaVA JSON files under `root`; return their paths and scenes.

    pretrain.json: one caption per training image (`--version plain`); train.json: `turns`
    questions per training image, of every type, as one conversation; test.json: `n_test`
    single questions per split, each on its own held-out image, balanced over types."""
    rng = random.Random(seed)
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    jobs, pretrain, train, test = [], [], [], []
    all_types = [t for types in QUESTION_TYPES.values() for t in types]
    for k in range(n_train):
        scene, name = random_scene(rng, size), f"train_{k:05d}.png"
        jobs.append((scene, os.path.join(images, name)))
        pretrain.append({"id": f"p{k}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}]})
        types = rng.sample(all_types, len(all_types)) * (turns // len(all_types) + 1)
        train.append(_record(f"t{k}", name, [question(rng, scene, t)[:2] for t in types[:turns]]))
    for split, types in QUESTION_TYPES.items():
        for k in range(n_test):
            scene, name = random_scene(rng, size), f"test_{split}_{k:05d}.png"
            jobs.append((scene, os.path.join(images, name)))
            q, a, info = question(rng, scene, types[k % len(types)])
            test.append(_record(f"{split}{k}", name, [(q, a)], info=info, scene=scene))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render, jobs, chunksize=64))
    else:
        for job in jobs:
            _render(job)
    paths = {"image_folder": images}
    for name, records in (("pretrain", pretrain), ("train", train), ("test", test)):
        paths[name] = os.path.join(root, f"{name}.json")
        with open(paths[name], "w") as handle:
            json.dump(records, handle)
    paths["train_scenes"] = [scene for scene, _ in jobs[:n_train]]
    return paths


def blind_accuracy(train_path: str, test: List[dict]) -> Dict[str, float]:
    """Accuracy per split of the best image-blind answerer one can fit on the training
    conversations: for each question text, its most frequent training answer."""
    with open(train_path) as handle:
        seen = collections.defaultdict(collections.Counter)
        for record in json.load(handle):
            conv = record["conversations"]
            for q, a in zip(conv[::2], conv[1::2]):
                seen[q["value"].replace("<image>\n", "")][a["value"]] += 1
    hits = collections.defaultdict(list)
    for record in test:
        q, a = record["conversations"][0]["value"].replace("<image>\n", ""), record["conversations"][1]["value"]
        guess = seen[q].most_common(1)[0][0] if seen[q] else ""
        hits[record["info"]["split"]].append(guess == a)
    return {split: sum(h) / len(h) for split, h in hits.items()}
