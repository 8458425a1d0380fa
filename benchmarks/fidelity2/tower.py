"""The study's vision tower: a small CLIP ViT (transformers' `CLIPVisionModel`, which upstream's
`CLIPVisionTower` loads from a folder), pretrained on the task's training images.

No pretrained vision weights can be had here. The tower is trained with dense supervision from
the renderer rather than contrastively: each patch feature of the layer LLaVA reads
(`mm_vision_select_layer -2`) must tell, through linear heads, the color and the shape of the
object covering that patch (or background). Caption contrast teaches a global summary; LLaVA
reads patches, and the questions ask about single objects, so per-patch labels are what the
language model needs from the tower. A third head asks each patch for its grid cell: location
questions name a cell, and the LM otherwise has only the tokens' raster order to find it by
(`cell_head=False` leaves it out). After this stage the tower is frozen, as upstream freezes it.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

import task


def build(image_size: int, patch: int, hidden: int, layers: int, heads: int, seed: int):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch,
                              projection_dim=hidden)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return CLIPVisionModel(config), processor


def _arrays(job):
    """One scene's uint8 image and per-patch color / shape labels (0: background)."""
    scene, patch = job
    owner = task.patch_labels(scene, patch)
    colors, shapes = list(task.COLORS), list(task.SHAPES)
    color = [0 if o == 0 else colors.index(scene["objects"][o - 1]["color"]) + 1 for o in owner]
    shape = [0 if o == 0 else shapes.index(scene["objects"][o - 1]["shape"]) + 1 for o in owner]
    return np.asarray(task.draw(scene), dtype=np.uint8), np.asarray(color), np.asarray(shape)


def _tensors(scenes: List[dict], patch: int, device, workers: int):
    jobs = [(s, patch) for s in scenes]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_arrays, jobs, chunksize=32))
    else:
        rows = [_arrays(j) for j in jobs]
    return [torch.from_numpy(np.stack(col)).to(device) for col in zip(*rows)]


def pretrain(out_dir: str, scenes: List[dict], *, image_size: int, patch: int, hidden: int, layers: int,
             heads: int, steps: int, batch: int, lr: float, seed: int, device, workers: int = 1,
             cell_head: bool = True, log=print) -> dict:
    """Train the tower on `scenes` (the LLaVA training images), save it with its processor to
    `out_dir`, and return held-out per-patch accuracies on object patches."""
    model, processor = build(image_size, patch, hidden, layers, heads, seed)
    model.to(device).train()
    heads_ = torch.nn.ModuleDict({"color": torch.nn.Linear(hidden, len(task.COLORS) + 1),
                                  "shape": torch.nn.Linear(hidden, len(task.SHAPES) + 1)})
    if cell_head:
        heads_["cell"] = torch.nn.Linear(hidden, len(task.CELLS))
    heads_.to(device)
    params = list(model.parameters()) + list(heads_.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    images, colors, shapes = _tensors(scenes, patch, device, workers)
    mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)
    grid = image_size // patch
    index = torch.arange(grid, device=device) * 3 // grid
    cells = (index[:, None] * 3 + index[None, :]).flatten()  # each patch's grid cell, row-major
    n_held = max(2, len(scenes) // 20)  # the first images are held out
    gen = torch.Generator().manual_seed(seed)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda"
           else contextlib.nullcontext())

    def loss_and_hits(rows):
        rows = rows.to(images.device)
        # As the processor normalizes (the images are already at its size).
        pixels = (images[rows].permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        color, shape, cell = colors[rows], shapes[rows], cells.expand(len(rows), -1)
        with amp:
            feats = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        losses, hits = 0.0, {}
        for name, target in (("color", color), ("shape", shape), ("cell", cell)):
            if name not in heads_:
                continue
            logits = heads_[name](feats.float())
            # Object patches are ~10 % of the image: weight them up so background does not dominate.
            weight = torch.ones(logits.shape[-1], device=device)
            if name != "cell":
                weight[1:] = 5.0
            losses = losses + F.cross_entropy(logits.flatten(0, 1), target.flatten(), weight=weight)
            on = target > 0 if name != "cell" else torch.ones_like(target, dtype=torch.bool)
            hits[name] = (logits.argmax(-1)[on] == target[on]).float().mean().item()
        return losses, hits

    started = time.time()
    for step in range(steps):
        loss, _ = loss_and_hits(torch.randint(n_held, len(scenes), (batch,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"tower step {step}/{steps}: loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        _, hits = loss_and_hits(torch.arange(n_held))
    os.makedirs(out_dir, exist_ok=True)
    # bf16 on a GPU, as LLaVA training runs it: small enough to come back from a device call.
    model.to(torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"steps": steps, "seconds": round(time.time() - started, 1), "loss_last": round(loss.item(), 4),
            "held_out_patch_accuracy": {k: round(v, 4) for k, v in hits.items()}, "held_out_images": n_held,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
