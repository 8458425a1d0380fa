#!/usr/bin/env python
"""Why a dense model of the fidelity study answers as it does: probes of an exported dense
model (the dense.tar.part* and results.json that `run_study.py --set stop_after=dense` writes).

    python benchmarks/fidelity/diagnose.py --dense_from DIR --work /tmp/fidwork --out diagnosis.json

1. reading: teacher-forced on training-format conversations (the questions, then the
   caption), top-1 accuracy of each answer's first token per question turn, and of the
   caption's color, shape and "empty" words; the caption is also asked as the first turn,
   and in reversed and shuffled cell order. A model that reads each cell by its name does
   as well in every place and order; one that reads by where an item stands does not;
2. pruning: a test split on new scenes (`task.write_splits`), evaluated as `run_study.py` does, per
   selection rule at one budget: accuracy, the share of the visual tokens reaching the last
   layer that lie in the question's region (`kept_in_region`), the commonest answers;
3. cells: dense, the color of every occupied cell of new scenes asked for, accuracy per cell
   name, and where each wrong answer comes from: the color of a cell next to the named one
   (a lookup that lands beside it), of another cell, of no cell, or not a color; beside it the
   shares a lookup blind to place would give (another cell's color, drawn uniformly);
4. attention: dense, eager attention per layer on the same kind of questions: how much of the
   attention paid to the image lands on the asked cell, from the token that predicts the
   answer and from the question's tokens (SparseVLM's raters), against the cell's share.

Runs where it is started (CPU by default), the LLM in fp32; scenes come from their own seed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import fields, replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import task  # noqa: E402
from run_study import (BUDGETS, METHODS, Config, Evaluator, build_study_clip, built_config,  # noqa: E402
                       import_dense, prompt_ids)

CONTENT_WORDS = set(task.COLORS) | set(task.SHAPES) | {"empty"}
PROBES = ("reading", "pruning", "cells", "attention")


def load_dense(folder: str, built: dict, work: str, device: str):
    """The exported model with its CLIP rebuilt where its config names it; the Config of the
    run that built it (`built`: `run_study.built_config` of that run's results.json)."""
    names = {f.name for f in fields(Config)}
    cfg = replace(Config(**{k: v for k, v in built.items() if k in names}), device=device, precision="fp32")
    dense_dir = os.path.join(work, "llava-dense")
    os.makedirs(work, exist_ok=True)
    import_dense(folder, dense_dir, {}, print, cfg)
    with open(os.path.join(dense_dir, "config.json"), encoding="utf-8") as handle:
        build_study_clip(cfg, json.load(handle)["mm_vision_tower"])
    return cfg, Evaluator(cfg, [], "", print).load(dense_dir)


def label_hits(loaded, image, pairs, device: str):
    """Teacher-forced top-1 hits of every answer token, one list of (token, hit) per turn."""
    import torch

    from llava import conversation
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images
    from llava.train.train import preprocess

    tokenizer, model, processor = loaded
    conversation.default_conversation = conversation.conv_templates["v1"]
    data = preprocess([task.llava_record("x", "x", pairs)["conversations"]], tokenizer, has_image=True)
    ids, labels = data["input_ids"], data["labels"][0]
    pixels = process_images([image], processor, model.config).to(device, model.dtype)
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), images=pixels, image_sizes=[image.size]).logits[0].cpu()
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    n_visual = logits.shape[0] - ids.shape[1] + 1
    labels = torch.cat([labels[:at], torch.full((n_visual,), IGNORE_INDEX), labels[at + 1:]])[1:]
    hits = logits[:-1].argmax(-1) == labels
    turns, turn = [], []
    for position in (labels != IGNORE_INDEX).nonzero()[:, 0].tolist():
        token = int(labels[position])
        turn.append((tokenizer.convert_ids_to_tokens(token).lstrip("▁"), bool(hits[position])))
        if token == tokenizer.eos_token_id:
            turns.append(turn)
            turn = []
    return turns


def content_hits(turn) -> list:
    return [hit for token, hit in turn if token and any(word.startswith(token) for word in CONTENT_WORDS)]


def reading(loaded, cfg: Config, images: int, seed: int) -> dict:
    rng = random.Random(seed)
    per_turn = [[] for _ in range(cfg.turns)]
    caption = {}  # "order, place" -> hits
    for _ in range(images):
        scene = task.random_scene(rng, cfg.image_size, cfg.empty_prob)
        image = task.draw_scene(scene)
        questions = [task.make_question(rng, scene, t)[:2]
                     for t in task.type_cycle(rng, cfg.turns, task.DEFAULT_TRAIN_MIX)]
        orders = {"reading": list(range(9)), "reversed": list(range(8, -1, -1)), "shuffled": rng.sample(range(9), 9)}
        for order, cells in orders.items():
            described = (task.DESCRIBE, task.caption(scene, cells))
            turns = label_hits(loaded, image, questions + [described], cfg.device)
            caption.setdefault(f"{order}, last", []).extend(content_hits(turns[-1]))
            if order == "reading":
                for k in range(cfg.turns):
                    per_turn[k].append(turns[k][0][1])
            first = label_hits(loaded, image, [described], cfg.device)[-1]
            caption.setdefault(f"{order}, first", []).extend(content_hits(first))
    answers = [hit for turn in per_turn for hit in turn]
    return {"images": images,
            "answer_first_token_top1": sum(answers) / len(answers),
            "answer_top1_per_turn": [round(sum(t) / len(t), 4) for t in per_turn],
            "caption_content_top1": {k: round(sum(v) / len(v), 4) for k, v in caption.items()},
            "caption_content_tokens": {k: len(v) for k, v in caption.items()}}


def pruning(loaded, cfg: Config, work: str, questions: int, retain: int, seed: int) -> dict:
    paths = task.write_splits(os.path.join(work, "diagnose-data"), size=cfg.image_size, n_train=0,
                              n_test_images=max(1, questions // len(task.QUESTION_TYPES)), n_test=questions,
                              seed=seed, empty_prob=cfg.empty_prob)
    with open(paths["test"], encoding="utf-8") as handle:
        records = json.load(handle)
    folder = paths["image_folder"]
    evaluator = Evaluator(replace(cfg, eval_batch=min(cfg.eval_batch, 25)), records, folder, print)
    results = {}
    for method in ("dense",) + METHODS:
        entry = evaluator.evaluate(loaded, method, None if method == "dense" else retain)
        results[method] = {k: entry[k] for k in ("accuracy", "per_type", "kept_in_region", "top_answers")
                           if k in entry}
        print(method, json.dumps(results[method]), flush=True)
    return {"questions": questions, "retain": retain, "methods": results}


def wrong_answer_source(scene: dict, cell: int, prediction: str) -> str:
    """Where a wrong color answer about `cell` comes from (see `cells`)."""
    answer = task.normalize(prediction)
    if answer not in task.COLORS:
        return "not_a_color"
    row, col = divmod(cell, 3)
    holders = [i for i, item in enumerate(scene["cells"]) if item is not None and i != cell and item["color"] == answer]
    if any(abs(i // 3 - row) + abs(i % 3 - col) == 1 for i in holders):
        return "neighbour_cell"
    return "other_cell" if holders else "no_cell"


def blind_wrong_answer_sources(asked) -> dict:
    """For the wrongly answered (scene, cell) pairs `asked`: where their answers would come from
    if each were the color of another occupied cell of a different color, drawn uniformly (a
    lookup blind to place; a neighbour's color is now and then also another cell's, and
    neighbour wins the tie). Only "neighbour_cell" and "other_cell" can come out."""
    shares = {}
    for scene, cell in asked:
        answer = scene["cells"][cell]["color"]
        colors = [item["color"] for i, item in enumerate(scene["cells"])
                  if item is not None and i != cell and item["color"] != answer]
        for color in colors:
            source = wrong_answer_source(scene, cell, color)
            shares[source] = shares.get(source, 0.0) + 1 / len(colors)
    total = sum(shares.values())
    return {source: round(n / total, 4) for source, n in sorted(shares.items())} if total else {}


def cell_scene_seed(seed: int) -> int:
    """The probe's scenes: odd seeds are training scenes in `task.write_splits` (2 s + 1), so
    --seed S draws from 2 S + 3, which is the exporting run's training seed only for S = its seed - 1."""
    return 2 * seed + 3


def cells(loaded, cfg: Config, work: str, images: int, seed: int) -> dict:
    folder = os.path.join(work, "diagnose-cells")
    scenes = task.make_scenes(folder, "cells", images, seed=cell_scene_seed(seed), size=cfg.image_size,
                              empty_prob=cfg.empty_prob)
    records, asked = [], []
    for i, (name, scene) in enumerate(scenes):
        for cell, item in enumerate(scene["cells"]):
            if item is not None:
                pair = (task.color_question(cell), item["color"])
                records.append(task.llava_record(f"cells-{i}-{cell}", name, [pair], {"type": "color", "cell": cell}))
                asked.append((scene, cell))
    entry = Evaluator(replace(cfg, eval_batch=min(cfg.eval_batch, 25)), records, folder, print).evaluate(
        loaded, "dense", None)
    per_cell, sources, wrong = {}, {}, []
    for (scene, cell), correct, prediction in zip(asked, entry["_correct"], entry["_predictions"]):
        per_cell.setdefault(task.CELL_NAMES[cell], []).append(correct)
        if not correct:
            source = wrong_answer_source(scene, cell, prediction)
            sources[source] = sources.get(source, 0) + 1
            wrong.append((scene, cell))
    return {"images": images, "questions": len(records), "accuracy": entry["accuracy"],
            "per_cell": {name: round(sum(v) / len(v), 4) for name, v in per_cell.items()},
            "questions_per_cell": {name: len(v) for name, v in per_cell.items()},
            "wrong_answers": dict(sorted(sources.items())),
            "wrong_answer_shares_if_blind": blind_wrong_answer_sources(wrong)}


def region_shares(attn, rows, start: int, inside):
    """[H, R]: per head and query position of `rows`, the share of the attention paid to the
    visual tokens (at `start`, `len(inside)` of them) that lands on those marked `inside`.
    `attn`: one layer's probabilities [H, L, L]."""
    weights = attn[:, rows, start:start + len(inside)].float()  # [H, R, V]
    return (weights * inside.float()).sum(-1) / weights.sum(-1).clamp_min(1e-12)


def attention(loaded, cfg: Config, work: str, images: int, seed: int) -> dict:
    """Where the dense model looks. For color questions about each occupied cell, eager
    attention per layer: of the attention paid to the visual tokens, the share on the asked
    cell, from the last prompt token (it predicts the answer) and from the prompt's text after
    the image (the question, where SparseVLM's raters come from); averaged over heads, and for
    the layer's best head. `chance`: the cell's share of the visual tokens.
    `question_best_token`: the question token whose heads (averaged) look most at the asked
    cell, against the same maximum for another occupied cell of the scene (the control: a
    maximum over tokens is above `chance` even where no token looks)."""
    import torch
    from PIL import Image

    import sparsevlm_patch
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images

    tokenizer, model, processor = loaded
    sparsevlm_patch.disable(model)
    folder = os.path.join(work, "diagnose-attention")
    scenes = task.make_scenes(folder, "attention", images, seed=cell_scene_seed(seed), size=cfg.image_size,
                              empty_prob=cfg.empty_prob)
    n_visual = model.get_vision_tower().num_patches
    cell_masks = torch.tensor([[task.in_region(p, n_visual, {"cell": c}) for p in range(n_visual)] for c in range(9)],
                              device=cfg.device)
    sums = {"answer_token": 0, "question_tokens": 0}  # [layers, H] sums over questions
    best = {"asked_cell": 0, "another_occupied_cell": 0}  # [layers] sums over questions
    chance, count, question_tokens, controlled = 0.0, 0, 0, 0
    for name, scene in scenes:
        image = Image.open(os.path.join(folder, name)).convert("RGB")
        pixels = process_images([image], processor, model.config).to(cfg.device, model.dtype)
        for cell, item in enumerate(scene["cells"]):
            if item is None:
                continue
            ids = prompt_ids(tokenizer, task.color_question(cell))[None]
            at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
            with torch.inference_mode():
                out = model(input_ids=ids.to(cfg.device), images=pixels, image_sizes=[image.size],
                            output_attentions=True)
            length = out.attentions[0].shape[-1]
            inside = cell_masks[cell]
            rows = {"answer_token": torch.tensor([length - 1]),
                    "question_tokens": torch.arange(at + n_visual, length)}
            for key, query in rows.items():
                sums[key] = sums[key] + torch.stack([region_shares(a[0], query, at, inside).mean(-1)
                                                     for a in out.attentions]).cpu()
            others = [c % 9 for c in range(cell + 1, cell + 9) if scene["cells"][c % 9] is not None]
            if others:
                for key, mask in (("asked_cell", inside), ("another_occupied_cell", cell_masks[others[0]])):
                    best[key] = best[key] + torch.stack([
                        region_shares(a[0], rows["question_tokens"], at, mask).mean(0).max()
                        for a in out.attentions]).cpu()
                controlled += 1
            chance += float(inside.float().mean())
            count += 1
            question_tokens += len(rows["question_tokens"])
    report = {"images": images, "questions": count, "chance": round(chance / count, 4),
              "question_tokens_per_prompt": round(question_tokens / count, 2)}
    for key, total in sums.items():
        mean = total / count  # [layers, H]
        report[key] = {"mean_head": [round(float(v), 4) for v in mean.mean(1)],
                       "best_head": [round(float(v), 4) for v in mean.max(1).values]}
    report["question_best_token"] = {"questions": controlled, **{
        key: [round(float(v), 4) for v in total / controlled] for key, total in best.items() if controlled}}
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense_from", required=True, help="folder with dense.tar.part* and results.json")
    parser.add_argument("--work", required=True, help="scratch folder (the model is unpacked here)")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--images", type=int, default=24, help="scenes for the reading probe")
    parser.add_argument("--questions", type=int, default=200, help="questions for the pruning probe")
    parser.add_argument("--cell_images", type=int, default=60, help="scenes for the per-cell color probe")
    parser.add_argument("--attention_images", type=int, default=20, help="scenes for the attention probe")
    parser.add_argument("--probes", default=",".join(PROBES),
                        help=f"comma-separated probes to run, of {','.join(PROBES)} (default: all)")
    parser.add_argument("--retain", type=int, default=64, choices=BUDGETS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args(argv)
    for flag in ("images", "questions", "cell_images", "attention_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: expected at least 1")
    probes = [p for p in args.probes.split(",") if p]
    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        parser.error(f"--probes {args.probes!r}: expected one or more of {','.join(PROBES)}, comma-separated")

    with open(os.path.join(args.dense_from, "results.json"), encoding="utf-8") as handle:
        exported = json.load(handle)
    built = built_config(exported)
    if {"cells", "attention"} & set(probes) and cell_scene_seed(args.seed) == 2 * built.get("seed", 0) + 1:
        parser.error(f"--seed {args.seed}: the cells and attention probes would draw the exporting run's "
                     "training scenes "
                     f"(its seed is {built.get('seed', 0)}); expected any other seed")

    import torch

    torch.manual_seed(args.seed)
    work = os.path.abspath(args.work)
    cfg, loaded = load_dense(args.dense_from, built, work, args.device)
    run = {"reading": lambda: reading(loaded, cfg, args.images, args.seed),
           "pruning": lambda: pruning(loaded, cfg, work, args.questions, args.retain, args.seed),
           "cells": lambda: cells(loaded, cfg, work, args.cell_images, args.seed),
           "attention": lambda: attention(loaded, cfg, work, args.attention_images, args.seed)}
    report = {"command": "python benchmarks/fidelity/diagnose.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": exported.get("note")}
    report.update((probe, run[probe]()) for probe in PROBES if probe in probes)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k in ("reading", "cells", "attention")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
