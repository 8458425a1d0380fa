"""The fidelity task: a 3 x 3 grid of small colored shapes, questions about one region.

Every image is a 3 x 3 grid of cells; most cells hold one small shape (a color from
COLORS, a kind from SHAPES, a random size and a random place inside its cell), the
others are empty. Every question is answered by one region of the image, with one word:

    color   "What color is the shape in the top-left cell?"        -> red
    shape   "What shape is in the bottom-center cell?"              -> triangle
    row     "Is there a triangle in the bottom row?"                -> yes / no
    column  "Is there a blue shape in the left column?"            -> yes / no

Cell questions point at 1/9 of the image (64 of 576 patches at 336 px / patch 14), row and
column questions at 1/3. Yes/no questions are balanced. Splits are upstream LLaVA JSON
(``[{"id", "image", "conversations": [...]}]``):

* ``pretrain``: one caption per image (``--version plain``: exactly two turns), the grid
  read out cell by cell;
* ``train``: several questions per image as one multi-turn conversation (``--version v1``);
* ``distill``: single-turn samples from the training images (one question per sample, so
  the question that guides pruning is the one being answered);
* ``test``: single-turn samples on held-out images, balanced over question types.

Pure Python + Pillow; deterministic for a given seed. Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
QUESTION_TYPES = ("color", "shape", "row", "column")
BACKGROUNDS = ((255, 255, 255), (240, 240, 240), (250, 246, 236))


def cell_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "center"
    return f"{ROWS[row]}-{COLUMNS[col]}"


CELL_NAMES = [cell_name(r, c) for r in range(3) for c in range(3)]


# ----------------------------------------------------------------------------- scenes

def random_scene(rng: random.Random, size: int, empty_prob: float = 0.2) -> dict:
    """A 3 x 3 grid: each cell empty (probability `empty_prob`) or one shape.

    Shapes are "small": their radius is 22-38 % of the cell side, placed anywhere inside
    the cell, so they never cross into a neighbour.
    """
    cell = size / 3.0
    cells = []
    for index in range(9):
        row, col = divmod(index, 3)
        if rng.random() < empty_prob:
            cells.append(None)
            continue
        radius = rng.uniform(0.22, 0.38) * cell
        margin = radius + 0.04 * cell
        cx = col * cell + rng.uniform(margin, cell - margin)
        cy = row * cell + rng.uniform(margin, cell - margin)
        cells.append({"shape": rng.choice(SHAPES), "color": rng.choice(sorted(COLORS)),
                      "center": (cx, cy), "radius": radius})
    if all(c is None for c in cells):  # at least one shape
        return random_scene(rng, size, empty_prob)
    return {"size": size, "background": rng.choice(BACKGROUNDS), "cells": cells}


def draw_scene(scene: dict):
    from PIL import Image, ImageDraw

    size = scene["size"]
    image = Image.new("RGB", (size, size), scene["background"])
    draw = ImageDraw.Draw(image)
    for item in scene["cells"]:
        if item is None:
            continue
        cx, cy = item["center"]
        r = item["radius"]
        fill = COLORS[item["color"]]
        if item["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif item["shape"] == "square":
            s = 0.85 * r  # about the circle's area
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:  # triangle, pointing up
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return image


# ----------------------------------------------------------------------------- questions

def _cells_of(scene: dict, row: Optional[int] = None, col: Optional[int] = None) -> List[dict]:
    out = []
    for index, item in enumerate(scene["cells"]):
        r, c = divmod(index, 3)
        if item is not None and (row is None or r == row) and (col is None or c == col):
            out.append(item)
    return out


def color_question(cell: int) -> str:
    return f"What color is the shape in the {CELL_NAMES[cell]} cell?"


def make_question(rng: random.Random, scene: dict, qtype: str) -> Tuple[str, str, dict]:
    """One question of type `qtype` about `scene`: (question, answer, info).

    `info` names the region the answer lives in (``cell``, ``row`` or ``column`` index).
    Yes/no questions are yes with probability 1/2 whenever both answers are possible.
    """
    occupied = [i for i, item in enumerate(scene["cells"]) if item is not None]
    if qtype in ("color", "shape"):
        index = rng.choice(occupied)
        item = scene["cells"][index]
        name = CELL_NAMES[index]
        if qtype == "color":
            return color_question(index), item["color"], {"type": qtype, "cell": index}
        return f"What shape is in the {name} cell?", item["shape"], {"type": qtype, "cell": index}
    if qtype == "row":
        row = rng.randrange(3)
        present = sorted({item["shape"] for item in _cells_of(scene, row=row)})
        absent = [s for s in SHAPES if s not in present]
        want_yes = rng.random() < 0.5
        if (want_yes and present) or not absent:
            shape, answer = rng.choice(present), "yes"
        else:
            shape, answer = rng.choice(absent), "no"
        return (f"Is there a {shape} in the {ROWS[row]} row?", answer, {"type": qtype, "row": row})
    if qtype == "column":
        col = rng.randrange(3)
        present = sorted({item["color"] for item in _cells_of(scene, col=col)})
        absent = [c for c in sorted(COLORS) if c not in present]
        want_yes = rng.random() < 0.5
        if (want_yes and present) or not absent:
            color, answer = rng.choice(present), "yes"
        else:
            color, answer = rng.choice(absent), "no"
        return (f"Is there a {color} shape in the {COLUMNS[col]} column?", answer,
                {"type": qtype, "column": col})
    raise ValueError(f"unknown question type {qtype!r}: expected one of {QUESTION_TYPES}")


DESCRIBE = "Describe the grid."
DESCRIBE_ANY_ORDER = "Describe the grid, cells in any order."


def caption(scene: dict, order: Optional[Sequence[int]] = None) -> str:
    """The grid read out cell by cell (pretraining target), in reading order or in `order`."""
    parts = []
    for index in range(9) if order is None else order:
        item = scene["cells"][index]
        what = "empty" if item is None else f"{item['color']} {item['shape']}"
        parts.append(f"{CELL_NAMES[index]} {what}")
    return ", ".join(parts) + "."


def answer_vocabulary() -> List[str]:
    return sorted(COLORS) + list(SHAPES) + ["yes", "no"]


def in_region(patch: int, n_patches: int, info: dict) -> bool:
    """Whether visual token `patch` (row-major over a square patch grid of `n_patches`) lies
    in the region a question's `info` names: its cell, row or column of the 3 x 3 grid."""
    side = round(n_patches ** 0.5)
    row, col = divmod(patch, side)
    row, col = row * 3 // side, col * 3 // side
    if "cell" in info:
        return row * 3 + col == info["cell"]
    return row == info["row"] if "row" in info else col == info["column"]


# ----------------------------------------------------------------------------- scoring

def normalize(text: str) -> str:
    """Lowercase, trim whitespace and trailing punctuation."""
    return text.strip().lower().rstrip(".!?,;:").strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


# ----------------------------------------------------------------------------- writing

def _draw_and_save(job):
    seed, size, path, empty_prob = job
    scene = random_scene(random.Random(seed), size, empty_prob)
    if path is not None:
        draw_scene(scene).save(path, optimize=False, compress_level=1)
    return scene


def make_scenes(folder: str, prefix: str, n: int, seed: int, size: int, empty_prob: float = 0.2,
                workers: int = 1) -> List[Tuple[str, dict]]:
    """Draw `n` scenes into `folder` (file names relative to it); deterministic per seed."""
    os.makedirs(folder, exist_ok=True)
    names = [f"{prefix}_{i:06d}.png" for i in range(n)]
    jobs = [(seed * 1_000_003 + i, size, os.path.join(folder, name), empty_prob)
            for i, name in enumerate(names)]
    if workers > 1 and n >= 64:
        with ProcessPoolExecutor(workers) as pool:
            scenes = list(pool.map(_draw_and_save, jobs, chunksize=64))
    else:
        scenes = [_draw_and_save(job) for job in jobs]
    return list(zip(names, scenes))


def llava_record(rid: str, image: str, pairs: Sequence[Tuple[str, str]], info=None) -> dict:
    """One LLaVA-format record: the image tag on the first question, then (question, answer) turns."""
    conversations = []
    for turn, (question, answer) in enumerate(pairs):
        conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    record = {"id": rid, "image": image, "conversations": conversations}
    if info is not None:
        record["info"] = info
    return record


def type_cycle(rng: random.Random, k: int, weights: Dict[str, float]) -> List[str]:
    types = list(weights)
    return rng.choices(types, weights=[weights[t] for t in types], k=k)


DEFAULT_TRAIN_MIX = {"color": 1.0, "shape": 1.0, "row": 1.0, "column": 1.0}


def training_questions(rng: random.Random, scene: dict, turns: int, mix: Dict[str, float]) -> List[Tuple[str, str]]:
    """`turns` different questions about `scene`, their types drawn with weights `mix`."""
    pairs, seen = [], set()
    for qtype in type_cycle(rng, 3 * turns, mix):
        q, a, _ = make_question(rng, scene, qtype)
        if q in seen:
            continue
        seen.add(q)
        pairs.append((q, a))
        if len(pairs) == turns:
            break
    return pairs


def write_splits(root: str, *, size: int, n_train: int, n_test_images: int, n_test: int,
                 turns: int = 8, n_distill: int = 0, seed: int = 0, empty_prob: float = 0.2,
                 workers: int = 1, train_mix: Optional[Dict[str, float]] = None,
                 caption_turn: bool = False, shuffled_captions: float = 0.0) -> Dict[str, str]:
    """Write images and the four JSON splits under `root`; return their paths.

    Train/distill images and test images come from disjoint seeds. `n_test` single-turn
    test questions are spread evenly over the question types (and over `n_test_images`).
    `caption_turn`: every training conversation ends with "Describe the grid." and the
    cell-by-cell caption, nine image-dependent answers per image for the LLM itself (last,
    so that no question can be answered by copying from it).
    `shuffled_captions`: the share of those conversations whose caption lists the cells in a
    random order (asked with DESCRIBE_ANY_ORDER). A caption in reading order can be read out
    by where each cell comes in the list; a shuffled one only by looking each named cell up,
    which is what the questions need. The questions and splits stay the same for any share.
    """
    if not 0.0 <= shuffled_captions <= 1.0:
        raise ValueError(f"shuffled_captions={shuffled_captions}: expected a share in [0, 1]")
    mix = train_mix or DEFAULT_TRAIN_MIX
    image_dir = os.path.join(root, "images")
    rng = random.Random(seed)
    train_scenes = make_scenes(image_dir, "train", n_train, seed=2 * seed + 1, size=size,
                               empty_prob=empty_prob, workers=workers)
    test_scenes = make_scenes(image_dir, "test", n_test_images, seed=2 * seed + 2, size=size,
                              empty_prob=empty_prob, workers=workers)

    pretrain = [llava_record(f"pre-{i:06d}", name, [(DESCRIBE, caption(scene))])
                for i, (name, scene) in enumerate(train_scenes)]
    train = []
    order_rng = random.Random(seed + 7919)  # its own stream: the questions do not depend on it
    mix_rng = random.Random(seed + 15485863)  # another: the distill and test questions do not depend on the mix
    for i, (name, scene) in enumerate(train_scenes):
        pairs = training_questions(rng, scene, turns, DEFAULT_TRAIN_MIX)  # always drawn, as before the mix option
        if mix != DEFAULT_TRAIN_MIX:
            pairs = training_questions(mix_rng, scene, turns, mix)
        if caption_turn:
            if order_rng.random() < shuffled_captions:
                pairs.append((DESCRIBE_ANY_ORDER, caption(scene, order_rng.sample(range(9), 9))))
            else:
                pairs.append((DESCRIBE, caption(scene)))
        train.append(llava_record(f"train-{i:06d}", name, pairs))
    distill = []
    for i in range(n_distill):
        name, scene = train_scenes[i % len(train_scenes)]
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        q, a, info = make_question(rng, scene, qtype)
        distill.append(llava_record(f"distill-{i:06d}", name, [(q, a)], info))
    test = []
    for i in range(n_test):
        name, scene = test_scenes[i % len(test_scenes)]
        qtype = QUESTION_TYPES[(i // len(test_scenes) + i) % len(QUESTION_TYPES)]
        q, a, info = make_question(rng, scene, qtype)
        test.append(llava_record(f"test-{i:06d}", name, [(q, a)], info))

    paths = {}
    for split, records in (("pretrain", pretrain), ("train", train), ("distill", distill), ("test", test)):
        path = os.path.join(root, f"{split}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(records, handle)
        paths[split] = path
    paths["image_folder"] = image_dir
    return paths


def tokenizer_corpus(seed: int = 1234, n_scenes: int = 300, any_order: bool = False) -> List[str]:
    """Text for training the study's tokenizer: the chat template and every kind of
    question, answer and caption the task produces. `any_order` adds captions in a random
    cell order (for `shuffled_captions`); without it the corpus, and so the tokenizer, is
    the one of the runs before that option."""
    from llava.conversation import conv_templates  # only the template strings

    rng = random.Random(seed)
    system = conv_templates["v1"].system
    lines = [system, "USER: <image>\nDescribe the grid. ASSISTANT: yes</s>",
             ". , ; : ! ? ' \" ( ) [ ] - _ / < > = + * # %", "0 1 2 3 4 5 6 7 8 9"]
    for _ in range(n_scenes):
        scene = random_scene(rng, 336)
        lines.append(caption(scene))
        if any_order:
            order = random.Random(seed + len(lines)).sample(range(9), 9)  # not from `rng`: the rest stays the same
            lines.append(f"USER: {DESCRIBE_ANY_ORDER} ASSISTANT: {caption(scene, order)}</s>")
        for qtype in QUESTION_TYPES:
            q, a, _ = make_question(rng, scene, qtype)
            lines.append(f"USER: {q} ASSISTANT: {a}</s>")
            lines.append(q)
    return lines
