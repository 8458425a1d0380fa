#!/usr/bin/env python
"""Fidelity study: does text-guided pruning keep what the question needs, and does
distillation give back what pruning costs?

    python benchmarks/fidelity/run_study.py --preset smoke --out /tmp/fid      # CPU, ~1 min
    python benchmarks/fidelity/run_study.py --preset full --out DIR --time_budget 480   # one H200

Pipeline (every training stage is upstream's `llava.train.train`, launched as
`python -m sparsevlm_patch.train <upstream flags> <sparse flags>`):

 1. data: a 3 x 3 grid of small shapes per image, region questions (task.py), upstream JSON;
 2. from scratch: a tokenizer, a random frozen CLIP (576 patch tokens at 336 px), a random
    16-layer Llama; a linear probe checks that the CLIP features carry place and color;
 3. projector pretraining: `--version plain --tune_mm_mlp_adapter True`, dense
    (`--sparse False --align_loss_weight 0` = plain upstream training);
 4. fine-tuning: `--version v1 --pretrain_mm_mlp_adapter .../mm_projector.bin`, dense;
 5. evaluation on held-out images (greedy generation, exact match): dense; SparseVLM
    training-free at retain 192/128/96/64; at the same per-layer budgets two baselines, the
    plugin's public selection rules (`sparsevlm_patch.enable(model, retain_tokens=N,
    selection=...)`, each with its default token recycling: off): random visual tokens
    (`selection="random"`, seeded) and FastV (`selection="fastv"`). (Runs before the public
    rules swapped the plugin's internal scorer instead, with SparseVLM's recycling, as
    "fastv_last_token", and had a text-blind "visual_only" variant, which has no public rule
    and is no longer run.)
 6. sparse distillation: the plugin's training path, student and teacher = the dense
    fine-tuned model, `--retain_tokens N --align_loss_weight W`, one run per budget
    (runs in parallel on one GPU), then SparseVLM evaluation of each student at its budget;
    and a control (`dense_control`): the same steps on the same data, dense, without a teacher,
    evaluated dense: what the extra training alone gives;
 7. report: results.json, results.md (accuracy per method and budget, analytic prefill
    FLOPs from `sparsevlm_patch.last_stats`), accuracy_vs_tokens.png, the training logs.

With --time_budget the fine-tuning and distillation step counts are fitted to the budget
from step times measured in this run (the learning-rate schedule follows the chosen count).
Stages that fail stop the run with the error in results.json; partial results stay.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import task  # noqa: E402

BUDGETS = (192, 128, 96, 64)
BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
METHODS = ("sparsevlm", "random", "fastv")
# The public selection rule (`sparsevlm_patch.enable(..., selection=...)`) of each pruning method.
METHOD_RULES = {"sparsevlm": "sparsevlm", "random": "random", "fastv": "fastv",
                "fastv_last_token": "fastv"}  # the earlier runs' name of the FastV baseline
METHOD_LABELS = {
    "dense": "dense (all 576 visual tokens)",
    "sparsevlm": "SparseVLM, training-free (question raters)",
    "random": "random visual tokens",
    "fastv": "FastV (last prompt token rates)",
    "fastv_last_token": "FastV-style: last prompt token rates",  # earlier runs
    "visual_only": "text-blind: last visual token rates",  # earlier runs
    "sparsevlm_distilled": "SparseVLM + sparse distillation",
    "dense_control": "dense, fine-tuned for the distillation's steps (control)",
}


@dataclass
class Config:
    # task
    image_size: int = 336
    n_train: int = 64000
    turns: int = 10
    n_distill: int = 24000
    n_test_images: int = 500
    n_test: int = 1000
    empty_prob: float = 0.2
    caption_turn: bool = True  # training conversations end with the cell-by-cell caption
    shuffled_captions: float = 0.0  # of those captions, the share in a random cell order (run 4: 0.5)
    # Training questions about a row or column, per cell question. The distill and test splits
    # stay the same (run 6's `cnrc`, made before that was so, had other test questions).
    row_column_weight: float = 1.0
    # vision tower (random, frozen)
    clip_hidden: int = 256
    clip_layers: int = 2
    # "sincos": a 2-D sine-cosine position table (smooth in 2-D, as a pretrained CLIP's is);
    # "random": CLIP's random init (runs 1 and 2, with clip_pos_scale 10)
    clip_position: str = "sincos"
    clip_pos_scale: float = 0.5
    # LLM (random)
    hidden: int = 256
    layers: int = 16
    heads: int = 8
    intermediate: int = 1024
    vocab: int = 600
    # One token per cell name ("top-left" is otherwise "top", "-", "left"): run 3's model found
    # the one single-token cell, "center", at 100% and the eight others at 40-57%
    # (benchmarks/results/fidelity/diagnosis.json, "cells").
    cell_name_tokens: bool = False
    # RoPE base. Only a head's slowly turning pairs (< 90 degrees across 576 positions) can match
    # content over the whole image: at 10^4, 5 of a 32-wide head's 16 pairs, 22 of a 7B's 64;
    # at 10^6, 9 of 16; a 64-wide head has 11 of 32 at 10^4 and 18 at 10^6.
    rope_theta: float = 10000.0
    # training
    batch: int = 32
    pretrain_steps: int = 60
    pretrain_lr: float = 1e-3
    finetune_steps: int = 5000  # the cap with --time_budget
    min_finetune_steps: int = 50  # the floor with --time_budget
    finetune_lr: float = 1e-3
    distill_steps: int = 400  # the cap with --time_budget
    distill_lr: float = 1e-4
    align_loss_weight: float = 1.0
    workers: int = 12
    distill_workers: int = 2
    parallel: int = 4  # distillation runs at a time (the dense control runs beside them)
    # Also fine-tune the dense model on the distillation data for the same steps, dense and without
    # a teacher (upstream's own training): what the extra steps give without pruning or distillation.
    dense_control: bool = True
    precision: str = "tf32"  # fp32 | tf32 | bf16
    logging_steps: int = 10
    # evaluation
    eval_batch: int = 250
    probe_images: int = 64
    device: str = "cuda"
    cpu_threads: int = 1  # torch threads per process on CPU (runs overlap)
    seed: int = 0
    # budgeting (seconds; 0 = fixed step counts)
    time_budget: float = 0.0
    # Fine-tuning seconds per step for time_budget (0: 1.5 x the pretraining's, which two runs
    # sharing a machine inflate: runs 5-6 planned for 0.32-0.48 s and measured 0.29 s; with
    # continue_finetune, the earlier calls' measured fine-tuning step).
    finetune_step_seconds: float = 0.0
    distill_time: float = 110.0
    preflight: bool = True
    stop_after: str = ""  # "dense": stop after the dense evaluation and export the dense model
    dense_from: str = ""  # folder of an exported dense model (dense.tar.part*): skip steps 3-4
    continue_finetune: bool = False  # with dense_from: fine-tune the imported model further first


PRESETS = {
    "full": Config(),
    # CPU, tiny sizes: checks the pipeline end to end, learns nothing. 224 px gives 256 visual
    # tokens, so that every budget (192 ... 64) prunes.
    "smoke": Config(image_size=224, n_train=16, turns=3, n_distill=16, n_test_images=8, n_test=16,
                    clip_hidden=32, clip_layers=2, hidden=32, layers=16, heads=2, intermediate=64, vocab=400,
                    batch=4, pretrain_steps=2, finetune_steps=3, distill_steps=1, workers=0, distill_workers=0,
                    parallel=2, precision="fp32", logging_steps=1, eval_batch=8, probe_images=4, device="cpu",
                    preflight=False),
}


# ----------------------------------------------------------------------------- logging

class Log:
    def __init__(self, path: str):
        self.start = time.time()
        self.handle = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, *parts) -> None:
        line = f"[{time.time() - self.start:7.1f}s] " + " ".join(str(p) for p in parts)
        with self.lock:
            print(line, flush=True)
            self.handle.write(line + "\n")
            self.handle.flush()

    def elapsed(self) -> float:
        return time.time() - self.start


# ----------------------------------------------------------------------------- training

ACTIVE_RUNS = []


def collect_logs(work: str, out: str) -> None:
    """The training logs, one file (the device returns few files)."""
    folder = os.path.join(work, "logs")
    if not os.path.isdir(folder):
        return
    with open(os.path.join(out, "training_logs.txt"), "w", encoding="utf-8") as handle:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as log:
                lines = [l for l in log if "FutureWarning" not in l and "warnings.warn(" not in l
                         and "DataLoaderConfiguration(" not in l]
            handle.write(f"===== {name} =====\n")
            handle.writelines(lines[:40] + (["...\n"] if len(lines) > 400 else []) + lines[max(40, len(lines) - 360):])


class Run:
    """One training subprocess: output to a log file, timestamps of the Trainer's loss logs."""

    LOSS = re.compile(r"\{'loss': ")

    def __init__(self, name: str, argv: List[str], env: dict, log_path: str, logging_steps: int):
        self.name, self.argv, self.log_path, self.logging_steps = name, argv, log_path, logging_steps
        self.loss_times: List[float] = []
        self.started = time.time()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=ROOT, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        ACTIVE_RUNS.append(self)

    def _read(self) -> None:
        with open(self.log_path, "w", encoding="utf-8") as log:
            log.write("$ " + " ".join(self.argv) + "\n")
            for line in self.proc.stdout:
                if self.LOSS.search(line):
                    self.loss_times.append(time.time())
                log.write(line)
                log.flush()

    def step_seconds(self) -> Optional[float]:
        """Seconds per optimizer step, from the spacing of the loss logs (None: too few)."""
        t = self.loss_times
        if len(t) < 3:
            return None
        return (t[-1] - t[1]) / ((len(t) - 2) * self.logging_steps)

    def wait(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        if self in ACTIVE_RUNS:
            ACTIVE_RUNS.remove(self)
        self.seconds = time.time() - self.started
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8") as handle:
                return "".join(handle.readlines()[-n:])
        except OSError:
            return ""


def deepspeed_shim(work: str) -> Optional[str]:
    """A folder with a stand-in `deepspeed` package, or None when deepspeed is installed.

    Upstream's save of `--tune_mm_mlp_adapter` runs go through `maybe_zero_3`, which imports
    `deepspeed.zero` even without ZeRO-3 (and then uses it only for ZeRO-3 parameters). The
    GPU machine has no deepspeed; this stand-in (no package metadata, so transformers and
    accelerate still report deepspeed as absent) only satisfies that import.
    """
    if importlib.util.find_spec("deepspeed") is not None:
        return None
    root = os.path.join(work, "_deepspeed_shim")
    files = {
        "deepspeed/__init__.py": '"""Stand-in for llava\'s maybe_zero_3 import (no ZeRO-3 here)."""\nfrom . import zero\n',
        "deepspeed/zero/__init__.py": ("class GatheredParameters:\n    def __init__(self, *a, **k):\n"
                                       "        raise RuntimeError('ZeRO-3 is not available: deepspeed is not installed')\n"),
        "deepspeed/runtime/__init__.py": "",
        "deepspeed/runtime/zero/__init__.py": "",
        "deepspeed/runtime/zero/partition_parameters.py": (
            "import enum\n\n\nclass ZeroParamStatus(enum.Enum):\n    AVAILABLE = 1\n    NOT_AVAILABLE = 2\n"
            "    INFLIGHT = 3\n"),
    }
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return root


class Trainer:
    """Builds upstream training commands for the study's stages."""

    def __init__(self, cfg: Config, paths: dict, work: str, log: Log):
        self.cfg, self.paths, self.work, self.log = cfg, paths, work, log
        self.commands: Dict[str, str] = {}

    def flags(self, *, model: str, version: str, data: str, out: str, steps: int, lr: float,
              workers: int, group: bool = True, save_steps: int = 0) -> List[str]:
        cfg = self.cfg
        flags = [
            "--model_name_or_path", model, "--version", version,
            "--data_path", data, "--image_folder", self.paths["image_folder"],
            "--vision_tower", self.paths["clip"], "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
            "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad",
            "--group_by_modality_length", str(group), "--lazy_preprocess", "True",
            "--model_max_length", "2048", "--output_dir", out,
            "--max_steps", str(steps), "--per_device_train_batch_size", str(cfg.batch),
            "--gradient_accumulation_steps", "1", "--learning_rate", f"{lr:g}", "--weight_decay", "0.",
            "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
            "--logging_steps", str(cfg.logging_steps), "--report_to", "none",
            "--dataloader_num_workers", str(workers), "--seed", str(cfg.seed), "--disable_tqdm", "True",
        ]
        # Checkpoints only as a fallback for a run stopped at the time budget.
        flags += (["--save_strategy", "steps", "--save_steps", str(save_steps), "--save_total_limit", "1"]
                  if save_steps else ["--save_strategy", "no"])
        if cfg.device == "cpu":
            flags += ["--use_cpu", "True"]
        elif cfg.precision == "tf32":
            flags += ["--tf32", "True"]
        elif cfg.precision == "bf16":
            flags += ["--bf16", "True"]
        return flags

    def start(self, name: str, flags: List[str], extra_path: Optional[str] = None) -> Run:
        argv = [sys.executable, "-m", "sparsevlm_patch.train"] + flags
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env["SPARSEVLM"] = "1"  # the plugin's entry point; --sparse False makes a run plain upstream
        if self.cfg.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(self.cfg.cpu_threads))
        python_path = [ROOT] + ([extra_path] if extra_path else []) + [env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in python_path if p)
        shown = ["python", "-m", "sparsevlm_patch.train"] + [self._short(f) for f in flags]
        self.commands[name] = " ".join(shown)
        self.log(f"start {name}: {self.commands[name]}")
        return Run(name, argv, env, os.path.join(self.work, "logs", f"{name}.log"), self.cfg.logging_steps)

    def _short(self, value: str) -> str:
        return value.replace(self.work, "$WORK")

    def finish(self, run: Run, kill_at: Optional[float] = None) -> dict:
        """Wait for `run`. Past `kill_at` (seconds since the study started) it is stopped and
        its latest checkpoint (`--save_strategy steps`) stands in for the final save."""
        stopped = False
        while kill_at is not None and run.proc.poll() is None:
            if self.log.elapsed() > kill_at:
                self.log(f"{run.name}: time budget reached, stopping it")
                run.kill()
                stopped = True
                break
            time.sleep(1.0)
        code = run.wait()
        out = self._out_of(run)
        summary = {"seconds": round(run.seconds, 1), "step_seconds": run.step_seconds()}
        if stopped:
            checkpoints = sorted((d for d in os.listdir(out) if d.startswith("checkpoint-")) if os.path.isdir(out)
                                 else [], key=lambda d: int(d.split("-")[1]))
            if not checkpoints:
                raise RuntimeError(f"{run.name} was stopped at the time budget before its first checkpoint")
            latest = os.path.join(out, checkpoints[-1])
            for name in os.listdir(latest):  # the checkpoint's model files become the run's output
                if not name.startswith(("optimizer", "scheduler", "rng_state")):
                    shutil.copy2(os.path.join(latest, name), os.path.join(out, name))
            summary["stopped_at_time_budget"] = True
            summary["checkpoint"] = checkpoints[-1]
        elif code != 0:
            raise RuntimeError(f"training stage {run.name} failed (exit {code}); log tail:\n{run.tail()}")
        state_path = os.path.join(out, "trainer_state.json")
        if os.path.exists(state_path):
            with open(state_path, encoding="utf-8") as handle:
                history = json.load(handle).get("log_history", [])
            losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
            summary["steps"] = losses[-1][0] if losses else 0
            summary["loss_first"] = losses[0][1] if losses else None
            summary["loss_last"] = losses[-1][1] if losses else None
            for key in ("lm_loss", "align_loss"):
                values = [e[key] for e in history if key in e]
                if values:
                    summary[f"{key}_first"], summary[f"{key}_last"] = values[0], values[-1]
            end = [e for e in history if "train_runtime" in e]
            if end:
                summary["train_runtime"] = end[-1]["train_runtime"]
        self.log(f"done {run.name}: {summary}")
        return summary

    @staticmethod
    def _out_of(run: Run) -> str:
        return run.argv[run.argv.index("--output_dir") + 1]


# ----------------------------------------------------------------------------- evaluation

@contextlib.contextmanager
def scoring(model, method: str, retain: Optional[int] = None, seed: int = 0):
    """For the block, `model` runs `method`: "dense" disabled, any other with its public
    selection rule at `retain` (`sparsevlm_patch.enable(model, retain_tokens=retain,
    selection=METHOD_RULES[method], seed=seed)`, the rule's default recycling). Afterwards it
    is left as an evaluation leaves it: dense stays disabled, every other method prunes with
    SparseVLM at `retain` again."""
    import sparsevlm_patch

    if method == "dense":
        sparsevlm_patch.disable(model)
        yield model
        return
    if method not in METHOD_RULES:
        raise ValueError(f"unknown method {method!r}: the study's methods are dense, {', '.join(METHODS)}")
    sparsevlm_patch.enable(model, retain_tokens=retain, selection=METHOD_RULES[method], seed=seed)
    try:
        yield model
    finally:
        sparsevlm_patch.enable(model, retain_tokens=retain)


def prompt_ids(tokenizer, question: str):
    """Upstream's v1 prompt of one question about the image, as ids (the image as IMAGE_TOKEN_INDEX)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


class Evaluator:
    """Greedy generation on the held-out split with upstream's `generate`, exact match."""

    def __init__(self, cfg: Config, records: List[dict], image_folder: str, log: Log):
        self.cfg, self.records, self.image_folder, self.log = cfg, records, image_folder, log
        self._images = None

    def load(self, path: str):
        """Upstream's loader, minus its fp16 cast of the language model: the LLM runs in the
        training precision, the vision tower in fp16 (bf16) as upstream's training runs it (fp32
        on a CPU)."""
        import torch
        import transformers
        from transformers import AutoTokenizer

        from llava.model import LlavaLlamaForCausalLM

        transformers.logging.set_verbosity_error()  # the checkpoint's copy of the frozen tower is unused
        device = self.cfg.device
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False)
        model = LlavaLlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=True).to(device)
        tower = model.get_vision_tower()
        if not tower.is_loaded:
            tower.load_model()
        if self.cfg.precision == "bf16":
            tower.to(device=device, dtype=torch.bfloat16)
        else:  # fp16 as upstream on a GPU; on a CPU, where fp16 kernels are slow, fp32
            tower.to(device=device, dtype=torch.float16 if device != "cpu" else torch.float32)
        model.eval()
        # Batched generation: upstream re-pads the spliced batch on this side.
        model.config.tokenizer_padding_side = "left"
        return tokenizer, model, tower.image_processor

    def _prepare(self, tokenizer, model, processor):
        from PIL import Image

        from llava.constants import DEFAULT_IMAGE_TOKEN
        from llava.mm_utils import process_images

        if self._images is None:
            names = sorted({r["image"] for r in self.records})
            index = {name: i for i, name in enumerate(names)}
            pil = [Image.open(os.path.join(self.image_folder, n)).convert("RGB") for n in names]
            pixels = process_images(pil, processor, model.config)
            # In the LLM's dtype, as upstream's own evaluation scripts pass images: the tower
            # returns features in the images' dtype, and the projector is in the LLM's.
            self._images = (pixels.to(self.cfg.device, dtype=model.dtype), index, [im.size for im in pil])
        prompts, answers, types, image_ids = [], [], [], []
        for r in self.records:
            question = r["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN + "\n", "")
            prompts.append(prompt_ids(tokenizer, question))
            answers.append(r["conversations"][1]["value"])
            types.append(r["info"]["type"])
            image_ids.append(self._images[1][r["image"]])
        longest = max(len(tokenizer(" " + a, add_special_tokens=False).input_ids) for a in task.answer_vocabulary())
        return prompts, answers, types, image_ids, longest + 2

    def evaluate(self, loaded, method: str, retain: Optional[int]) -> dict:
        import torch

        import sparsevlm_patch

        tokenizer, model, processor = loaded
        prompts, answers, types, image_ids, max_new = self._prepare(tokenizer, model, processor)
        pixels, _, sizes = self._images
        started = time.time()
        correct, predictions, in_region = [], [], []
        sparse_flops = dense_flops = 0.0
        kept = []
        pad = tokenizer.pad_token_id
        with scoring(model, method, retain, seed=self.cfg.seed), torch.inference_mode():
            for start in range(0, len(prompts), self.cfg.eval_batch):
                chunk = list(range(start, min(start + self.cfg.eval_batch, len(prompts))))
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, width - len(prompts[i]):] = prompts[i]
                    mask[row, width - len(prompts[i]):] = 1
                rows = torch.tensor([image_ids[i] for i in chunk])
                out = model.generate(ids.to(self.cfg.device), attention_mask=mask.to(self.cfg.device),
                                     images=pixels[rows.to(pixels.device)], image_sizes=[sizes[i] for i in rows],
                                     max_new_tokens=max_new, do_sample=False, num_beams=1, use_cache=True,
                                     pad_token_id=pad)
                texts = tokenizer.batch_decode(out, skip_special_tokens=True)
                for row, i in enumerate(chunk):
                    predictions.append(texts[row])
                    correct.append(task.exact_match(texts[row], answers[i]))
                stats = sparsevlm_patch.last_stats(model) if method != "dense" else None
                if stats:
                    sparse_flops += stats["flops"]["sparse"]
                    dense_flops += stats["flops"]["dense"]
                    kept.extend(stats["kept_visual"])
                    reached = sparsevlm_patch.last_keep_mask(model).cpu()
                    for row, i in enumerate(chunk):
                        (start, count), = stats["image_spans"][row]
                        patches = reached[row, start:start + count].nonzero()[:, 0].tolist()
                        inside = [task.in_region(p, count, self.records[i]["info"]) for p in patches]
                        in_region.append(sum(inside) / max(1, len(inside)))
        result = {"accuracy": sum(correct) / len(correct), "n": len(correct),
                  "seconds": round(time.time() - started, 2)}
        result["per_type"] = {t: round(sum(c for c, tt in zip(correct, types) if tt == t)
                                       / max(1, sum(tt == t for tt in types)), 4) for t in task.QUESTION_TYPES}
        if dense_flops:
            result["flops_vs_dense"] = sparse_flops / dense_flops
            result["kept_visual_per_layer"] = [round(sum(k[j] for k in kept) / len(kept), 2)
                                               for j in range(len(kept[0]))]
        else:
            result["flops_vs_dense"] = 1.0
        if in_region:
            # Of the visual tokens that reach the last layer, the share inside the region the
            # question is about (a cell is 1/9 of the image, a row or column 1/3).
            result["kept_in_region"] = {t: round(sum(r for r, tt in zip(in_region, types) if tt == t)
                                                 / max(1, sum(tt == t for tt in types)), 4)
                                        for t in task.QUESTION_TYPES}
        result["top_answers"] = {t: collections.Counter(task.normalize(p) for p, tt in zip(predictions, types)
                                                        if tt == t).most_common(3) for t in task.QUESTION_TYPES}
        result["examples"] = [{"q": self.records[i]["conversations"][0]["value"].split("\n")[-1],
                               "answer": answers[i], "prediction": predictions[i]}
                              for i in range(min(3, len(predictions)))]
        result["_correct"], result["_predictions"] = correct, predictions
        return result


def agreement(a: dict, b: dict) -> float:
    return sum(x == y for x, y in zip(a["_correct"], b["_correct"])) / max(1, len(a["_correct"]))


# ----------------------------------------------------------------------------- report

def write_report(out: str, report: dict) -> None:
    clean = json.loads(json.dumps(report, default=str))
    for entry in _walk_results(clean):
        entry.pop("_correct", None)
        entry.pop("_predictions", None)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(clean, handle, indent=1)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(clean))
    try:
        plot(out, clean)
    except Exception as error:  # a missing matplotlib must not lose the numbers
        report.setdefault("warnings", []).append(f"plot failed: {error!r}")


SINGLE_ENTRIES = ("dense", "dense_control")  # results with no budget


def _walk_results(report: dict):
    results = report.get("results", {})
    for method, entry in results.items():
        if method in SINGLE_ENTRIES:
            yield entry
        else:
            yield from entry.values()


def _fmt(entry: Optional[dict]) -> str:
    return "–" if not entry else f"{100 * entry['accuracy']:.1f}"


def markdown(report: dict) -> str:
    results = report.get("results", {})
    budgets = [str(b) for b in report.get("budgets", BUDGETS)]
    lines = [f"# Fidelity study ({report.get('preset')}, {report.get('device_name', report.get('config', {}).get('device'))})",
             ""]
    dense = results.get("dense")
    if dense:
        lines.append(f"Held-out exact-match accuracy, {dense['n']} single-turn questions on unseen images "
                     "(greedy generation, one-word answers). Dense: "
                     f"**{100 * dense['accuracy']:.1f}%**; an image-blind model that gives the most frequent "
                     f"answer of each question type scores {100 * report.get('chance', 0):.1f}%.")
        lines.append("")
        if dense["accuracy"] < 0.9:
            lines.append(f"**The dense model is below the 90% target ({100 * dense['accuracy']:.1f}%)**: "
                         "differences between pruning methods only mean something once the dense model reads "
                         "the image (see the per-type rows and `agreement_with_dense` in results.json).")
            lines.append("")
    header = "| method | " + " | ".join(f"retain {b}" for b in budgets) + " |"
    lines += [header, "|---|" + "---|" * len(budgets)]
    for single in SINGLE_ENTRIES:
        if single in results:
            lines.append(f"| {METHOD_LABELS[single]} | " + " | ".join(_fmt(results[single]) for _ in budgets) + " |")
    for method in METHODS + ("sparsevlm_distilled",):
        if method in results:
            lines.append(f"| {METHOD_LABELS[method]} | "
                         + " | ".join(_fmt(results[method].get(b)) for b in budgets) + " |")
    flops = results.get("sparsevlm", {})
    if flops:
        lines.append("| prefill FLOPs vs dense (analytic, `last_stats`) | "
                     + " | ".join(f"{flops[b]['flops_vs_dense']:.3f}" if b in flops else "–" for b in budgets) + " |")
        lines.append("| visual tokens kept at layers 2/6/15 (mean) | "
                     + " | ".join("/".join(f"{k:g}" for k in flops[b].get("kept_visual_per_layer", []))
                                  if b in flops else "–" for b in budgets) + " |")
    lines.append("")
    lines.append("Accuracy in %. Same per-layer keep counts for every pruning row, each selection rule "
                 "(`sparsevlm_patch.enable(..., selection=...)`) with its default token recycling (on for "
                 "SparseVLM only). FLOPs: the decoder's prefill, selection included, "
                 "as `sparsevlm_patch.last_stats(model)['flops']` computes them.")
    lines.append("")
    if dense and results.get("sparsevlm"):
        lowest = budgets[-1]
        lines.append(f"Per question type at retain {lowest} (color / shape / row / column):")
        lines.append("")
        lines.append("| method | " + " | ".join(task.QUESTION_TYPES) + " |")
        lines.append("|---|" + "---|" * len(task.QUESTION_TYPES))
        for single in SINGLE_ENTRIES:
            if single in results:
                lines.append(f"| {single.replace('_', ' ')} | "
                             + " | ".join(f"{100 * results[single]['per_type'][t]:.1f}" for t in task.QUESTION_TYPES) + " |")
        for method in METHODS + ("sparsevlm_distilled",):
            entry = results.get(method, {}).get(lowest)
            if entry:
                lines.append(f"| {METHOD_LABELS[method]} | "
                             + " | ".join(f"{100 * entry['per_type'][t]:.1f}" for t in task.QUESTION_TYPES) + " |")
        lines.append("")
    chain = _calls(report)
    probe = next((r["probe"] for r in chain if r.get("probe")), None)
    if probe:
        p = probe
        lines.append(f"Vision tower check (linear probes on the frozen random CLIP's patch features, held-out "
                     f"images): grid cell of a token {100 * p['cell_probe_accuracy']:.1f}% (chance 11.1%), color "
                     f"under a token {100 * p['color_probe_accuracy']:.1f}% (majority class "
                     f"{100 * p['color_majority_baseline']:.1f}%).")
        lines.append("")
    training = {}
    for call in chain:
        training.update(call.get("training") or {})
    if training:
        lines.append("Training (upstream `llava.train.train` via `python -m sparsevlm_patch.train`"
                     + ("; the dense training in earlier calls, `dense_training` in results.json"
                        if len(chain) > 1 else "") + "):")
        lines.append("")
        lines.append("| stage | steps | seconds | loss first -> last | align loss first -> last |")
        lines.append("|---|---|---|---|---|")
        for name, s in training.items():
            align = (f"{s['align_loss_first']:.4f} -> {s['align_loss_last']:.4f}" if "align_loss_first" in s else "")
            loss = (f"{s['loss_first']:.3f} -> {s['loss_last']:.3f}" if s.get("loss_first") is not None else "")
            lines.append(f"| {name} | {s.get('steps', '')} | {s.get('seconds', '')} | {loss} | {align} |")
        lines.append("")
    if report.get("error"):
        lines += ["**The run stopped early:**", "", "```", report["error"][-2000:], "```", ""]
    return "\n".join(lines) + "\n"


def _calls(report: dict) -> List[dict]:
    """This call's report and the earlier calls' records it carries, earliest first."""
    chain = [report]
    while chain[-1].get("dense_training"):
        chain.append(chain[-1]["dense_training"])
    return chain[::-1]


def plot(out: str, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report.get("results", {})
    budgets = [int(b) for b in report.get("budgets", BUDGETS)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"sparsevlm": "o-", "random": "s--", "fastv": "^--", "sparsevlm_distilled": "D-"}
    for method, style in styles.items():
        per = results.get(method, {})
        xs = [b for b in budgets if str(b) in per]
        if xs:
            ax.plot(xs, [100 * per[str(b)]["accuracy"] for b in xs], style, label=METHOD_LABELS[method])
    if "dense" in results:
        ax.axhline(100 * results["dense"]["accuracy"], color="black", lw=1, label=METHOD_LABELS["dense"])
    if "dense_control" in results:
        ax.axhline(100 * results["dense_control"]["accuracy"], color="black", lw=1, ls="--",
                   label=METHOD_LABELS["dense_control"])
    ax.axhline(100 * report.get("chance", 0.375), color="gray", lw=0.8, ls=":", label="answer-prior chance")
    ax.set_xlabel("retained visual tokens (budget; 576 = all)")
    ax.set_ylabel("held-out exact-match accuracy (%)")
    ax.set_xticks(budgets)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Fidelity study: pruning a from-scratch LLaVA on region questions", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_tokens.png"), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- pipeline

def steps_for(seconds: float, step_seconds: float, cap: int, floor: int) -> int:
    return int(max(floor, min(cap, seconds / max(step_seconds, 1e-3))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--out", required=True, help="results folder (results.json, results.md, PNG, logs)")
    parser.add_argument("--work", help="scratch folder for data and checkpoints (default: OUT/work)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override Config fields")
    parser.add_argument("--note", default="", help="free text stored in results.json (e.g. the device command)")
    args = parser.parse_args(argv)

    cfg = replace(PRESETS[args.preset])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in asdict(cfg) or not _:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(asdict(cfg))}")
        kind = type(getattr(cfg, key))
        if kind is bool:
            if value.lower() not in BOOL_WORDS:
                parser.error(f"--set {item!r}: expected {key}= one of {sorted(BOOL_WORDS)}")
            setattr(cfg, key, BOOL_WORDS[value.lower()])
            continue
        try:
            setattr(cfg, key, kind(value))
        except ValueError:
            parser.error(f"--set {item!r}: expected {key}= a {kind.__name__}")
    for key, lowest, strict in (("rope_theta", 0.0, True), ("row_column_weight", 0.0, True),
                                ("finetune_step_seconds", 0.0, False)):
        value = getattr(cfg, key)
        if not math.isfinite(value) or value < lowest or (strict and value == lowest):
            parser.error(f"--set {key}={value}: expected a finite number {'>' if strict else '>='} {lowest:g}"
                         + (" (0: estimate)" if not strict else ""))
    out = os.path.abspath(args.out)
    work = os.path.abspath(args.work or os.path.join(out, "work"))
    os.makedirs(out, exist_ok=True)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    log = Log(os.path.join(out, "study.log"))
    report = {"preset": args.preset, "config": asdict(cfg), "budgets": list(BUDGETS),
              "command": "python benchmarks/fidelity/run_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "note": args.note, "results": {}, "training": {}, "timings": {}}
    def terminated(signum, frame):
        raise TimeoutError(f"terminated by signal {signum} after {log.elapsed():.0f}s")

    signal.signal(signal.SIGTERM, terminated)
    try:
        run_pipeline(cfg, out, work, log, report)
    except BaseException:
        report["error"] = traceback.format_exc()
        log("ERROR", report["error"])
    finally:
        for run in list(ACTIVE_RUNS):
            run.kill()
        report["timings"]["total"] = round(log.elapsed(), 1)
        write_report(out, report)
        collect_logs(work, out)
        log(f"wrote {out}/results.json, results.md, accuracy_vs_tokens.png, training_logs.txt")
    return 1 if report.get("error") else 0


def _after_training(cfg: Config) -> float:
    """Seconds to keep after the dense training: the dense evaluation and export, or the
    distillation (start-up included), the students' evaluations, the report and a margin."""
    return 45 if cfg.stop_after == "dense" else cfg.distill_time + 80


def train_dense(cfg: Config, paths: dict, work: str, log: Log, report: dict, trainer: Trainer,
                evaluator: Evaluator, dense_dir: str, deadline: Optional[float]) -> None:
    """Tokenizer and random LLM, projector pretraining, fine-tuning (steps 2-4)."""
    import torch

    import models

    corpus = task.tokenizer_corpus(any_order=cfg.shuffled_captions > 0)
    tokenizer = models.build_tokenizer(os.path.join(work, "tokenizer"), corpus, vocab_size=cfg.vocab,
                                       whole_words=task.CELL_NAMES if cfg.cell_name_tokens else ())
    base = models.build_llm(os.path.join(work, "llm-base"), tokenizer, hidden=cfg.hidden, layers=cfg.layers,
                            heads=cfg.heads, intermediate=cfg.intermediate, rope_theta=cfg.rope_theta,
                            seed=cfg.seed)
    log(f"built tokenizer ({len(tokenizer)} tokens), CLIP and random LLM")

    # 3. projector pretraining (dense, plain upstream) -- and the locality probe meanwhile
    pre_dir = os.path.join(work, "pretrain")
    pre = trainer.start("pretrain", trainer.flags(model=base, version="plain", data=paths["pretrain"], out=pre_dir,
                                                  steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, workers=cfg.workers,
                                                  group=False)
                        + ["--tune_mm_mlp_adapter", "True", "--sparse", "False", "--align_loss_weight", "0"],
                        extra_path=deepspeed_shim(work))
    try:
        t = time.time()
        images = sorted(os.listdir(paths["image_folder"]))
        probe_paths = [os.path.join(paths["image_folder"], n) for n in images if n.startswith("train")]
        report["probe"] = models.locality_probe(paths["clip"], probe_paths[:cfg.probe_images], device=cfg.device,
                                                dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
        log(f"locality probe ({round(time.time() - t, 1)}s): {report['probe']}")
    except Exception as error:
        report["probe_error"] = repr(error)
        log("probe failed:", repr(error))
    report["training"]["pretrain"] = trainer.finish(pre)
    projector = os.path.join(pre_dir, "mm_projector.bin")
    if not os.path.exists(projector):
        raise RuntimeError(f"pretraining saved no {projector}")

    # 4. fine-tuning (dense, plain upstream)
    ft_steps = cfg.finetune_steps
    if deadline:
        # Fine-tuning steps are longer than projector-only steps (multi-turn answers, weight
        # gradients): ~1.5 x.
        step = cfg.finetune_step_seconds or 1.5 * (report["training"]["pretrain"].get("step_seconds") or 0.2)
        left = deadline - log.elapsed() - _after_training(cfg) - 20  # 20: start-up of the fine-tuning process
        ft_steps = steps_for(left, step, cfg.finetune_steps, cfg.min_finetune_steps)
        log(f"time budget: {left:.0f}s for fine-tuning at ~{step:.3f}s/step -> {ft_steps} steps")
    ft = trainer.start("finetune", trainer.flags(model=base, version="v1", data=paths["train"], out=dense_dir,
                                                 steps=ft_steps, lr=cfg.finetune_lr, workers=cfg.workers,
                                                 save_steps=max(50, ft_steps // 8) if deadline else 0)
                       + ["--pretrain_mm_mlp_adapter", projector, "--sparse", "False", "--align_loss_weight", "0"])
    if cfg.preflight:
        # While the fine-tuning runs: the distillation path and every evaluation method, a few
        # steps and samples, on the GPU stack. A failure here stops the run early.
        try:
            pf_dir = os.path.join(work, "llava-preflight")
            pf = trainer.start("preflight-distill", trainer.flags(
                model=base, version="v1", data=paths["distill"], out=pf_dir, steps=3, lr=cfg.distill_lr,
                workers=0) + ["--pretrain_mm_mlp_adapter", projector, "--retain_tokens", "64",
                              "--teacher_model_name_or_path", base, "--align_loss_weight", "1.0"])
            trainer.finish(pf)
            small = Evaluator(replace(cfg, eval_batch=4), evaluator.records[:8], paths["image_folder"], log)
            loaded = small.load(pf_dir)
            checks = {m: small.evaluate(loaded, m, None if m == "dense" else 64)["accuracy"]
                      for m in ("dense",) + METHODS}
            log(f"preflight ok: {checks}")
            del loaded
        except Exception:
            ft.kill()
            raise
    report["training"]["finetune"] = trainer.finish(
        ft, kill_at=deadline - _after_training(cfg) if deadline else None)


def earlier_training(report: dict) -> dict:
    """The training records of the calls that trained an imported dense model (dense_from)."""
    return (report.get("dense_training") or {}).get("training") or {}


def fine_tuning_step_seconds(training: dict) -> Optional[float]:
    """The measured fine-tuning step time among a report's training records (not the
    projector pretraining's, whose steps are shorter)."""
    for stage in ("finetune-continued", "finetune"):
        seconds = (training.get(stage) or {}).get("step_seconds")
        if seconds:
            return seconds
    return None


def continue_dense(cfg: Config, paths: dict, log: Log, report: dict, trainer: Trainer, dense_dir: str,
                   deadline: Optional[float]) -> None:
    """More fine-tuning of an imported dense model (the middle of a chain of calls): the same
    data and flags, from its weights, with the schedule restarted over this call's steps."""
    steps = cfg.finetune_steps
    if deadline:
        step = cfg.finetune_step_seconds or fine_tuning_step_seconds(earlier_training(report)) or 0.3
        left = deadline - log.elapsed() - _after_training(cfg) - 20
        steps = steps_for(left, step, cfg.finetune_steps, cfg.min_finetune_steps)
        log(f"time budget: {left:.0f}s for more fine-tuning at ~{step:.3f}s/step -> {steps} steps")
    out = dense_dir + "-continued"
    run = trainer.start("finetune-continued", trainer.flags(
        model=dense_dir, version="v1", data=paths["train"], out=out, steps=steps, lr=cfg.finetune_lr,
        workers=cfg.workers, save_steps=max(50, steps // 8) if deadline else 0)
        + ["--sparse", "False", "--align_loss_weight", "0"])
    report["training"]["finetune-continued"] = trainer.finish(
        run, kill_at=deadline - _after_training(cfg) if deadline else None)
    shutil.rmtree(dense_dir)
    os.rename(out, dense_dir)


EXPORT_PART_BYTES = 15 * 2 ** 20  # files come back from the device in pieces of < 16 MiB


def export_dense(dense_dir: str, out: str, log: Log) -> None:
    """The dense model (weights, config, tokenizer; no checkpoints) as out/dense.tar.partNN."""
    import tarfile

    archive = os.path.join(out, "dense.tar")
    with tarfile.open(archive, "w") as tar:
        for name in sorted(os.listdir(dense_dir)):
            if not name.startswith("checkpoint-"):
                tar.add(os.path.join(dense_dir, name), arcname=name)
    with open(archive, "rb") as whole:
        for index, chunk in enumerate(iter(lambda: whole.read(EXPORT_PART_BYTES), b"")):
            with open(f"{archive}.part{index:02d}", "wb") as part:
                part.write(chunk)
    os.remove(archive)
    log(f"exported {dense_dir} to {archive}.part*")


def keep_best_export(folder: str, names: List[str]) -> Optional[str]:
    """Of the runs `names` (result folders under `folder`) that exported a dense model, the one
    of highest dense accuracy (the first on a tie); the others' exports are deleted, since the
    device returns about 60 MB (two_arms.sh). None when no run exported one."""
    def parts(name: str) -> List[str]:
        path = os.path.join(folder, name)
        return sorted(p for p in os.listdir(path) if p.startswith("dense.tar.part")) if os.path.isdir(path) else []

    def dense_accuracy(name: str) -> float:
        try:
            with open(os.path.join(folder, name, "results.json"), encoding="utf-8") as handle:
                return float(json.load(handle)["results"]["dense"]["accuracy"])
        except (OSError, KeyError, TypeError, ValueError):
            return -1.0

    exported = [name for name in names if parts(name)]
    if not exported:
        return None
    best = max(exported, key=dense_accuracy)
    for name in exported:
        if name != best:
            for part in parts(name):
                os.remove(os.path.join(folder, name, part))
    return best


# The settings an exported dense model depends on (the CLIP and the training data are
# rebuilt, not exported).
MODEL_FIELDS = ("image_size", "clip_hidden", "clip_layers", "clip_position", "clip_pos_scale", "hidden",
                "layers", "heads", "intermediate", "vocab", "cell_name_tokens", "rope_theta", "seed",
                "caption_turn", "shuffled_captions", "row_column_weight")


def built_config(report: dict) -> dict:
    """The Config fields a run's report names; runs 1-2 predate the position and caption-order
    choices (random positions, ordered captions), runs 1-4 the RoPE base (10^4), the cell-name
    tokens (none) and the training mix (even)."""
    return {"clip_position": "random", "shuffled_captions": 0.0, "rope_theta": 10000.0,
            "cell_name_tokens": False, "row_column_weight": 1.0, **(report.get("config") or {})}


def import_dense(folder: str, dense_dir: str, report: dict, log: Log, cfg: Config) -> None:
    """Unpack dense.tar.part* from `folder` into `dense_dir`; carry over the earlier report's
    training record (results.json beside the parts), which must name the same model settings."""
    import tarfile

    parts = sorted(n for n in os.listdir(folder) if n.startswith("dense.tar.part"))
    if not parts:
        raise FileNotFoundError(f"dense_from={folder!r} holds no dense.tar.part* files")
    earlier = os.path.join(folder, "results.json")
    if not os.path.exists(earlier):
        raise FileNotFoundError(f"dense_from={folder!r} holds no results.json: copy the exporting call's "
                                "report beside its parts (it names the settings the model was built with)")
    with open(earlier, encoding="utf-8") as handle:
        previous = json.load(handle)
    built = built_config(previous)
    differ = {k: (built[k], v) for k, v in asdict(cfg).items() if k in MODEL_FIELDS and k in built and built[k] != v}
    if differ:
        raise ValueError(f"dense_from={folder!r} was built with other settings than this run "
                         f"(field: (then, now)): {differ}; pass the same values with --set")
    report["dense_training"] = {k: previous.get(k) for k in (
        "command", "note", "config", "versions", "probe", "training", "commands", "timings", "chance",
        "dense_training")}
    report["dense_training"]["dense_accuracy"] = previous.get("results", {}).get("dense", {}).get("accuracy")
    archive = dense_dir + ".tar"
    with open(archive, "wb") as whole:
        for name in parts:
            with open(os.path.join(folder, name), "rb") as part:
                shutil.copyfileobj(part, whole)
    os.makedirs(dense_dir, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dense_dir, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    os.remove(archive)
    log(f"imported the dense model from {folder} ({len(parts)} parts)")


def training_mix(cfg: Config) -> Optional[Dict[str, float]]:
    if cfg.row_column_weight <= 0:
        raise ValueError(f"row_column_weight={cfg.row_column_weight}: expected a weight > 0")
    if cfg.row_column_weight == 1.0:
        return None  # task.DEFAULT_TRAIN_MIX
    return {"color": 1.0, "shape": 1.0, "row": cfg.row_column_weight, "column": cfg.row_column_weight}


def build_study_clip(cfg: Config, out_dir: str) -> str:
    """The random frozen CLIP of `cfg` (seeded: a later call rebuilds the same one)."""
    import models

    return models.build_clip(out_dir, image_size=cfg.image_size, hidden=cfg.clip_hidden, layers=cfg.clip_layers,
                             position=cfg.clip_position, pos_scale=cfg.clip_pos_scale, seed=cfg.seed)


def run_pipeline(cfg: Config, out: str, work: str, log: Log, report: dict) -> None:
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    import transformers

    import llava

    report["versions"] = {"python": sys.version.split()[0], "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "llava": getattr(llava, "__version__", "1.2.2.post1 (installed)")}
    deadline = cfg.time_budget if cfg.time_budget > 0 else None
    timings = report["timings"]

    # 1. data
    t = time.time()
    data_dir = os.path.join(work, "data")
    paths = task.write_splits(data_dir, size=cfg.image_size, n_train=cfg.n_train, n_test_images=cfg.n_test_images,
                              n_test=cfg.n_test, turns=cfg.turns, n_distill=cfg.n_distill, seed=cfg.seed,
                              empty_prob=cfg.empty_prob, workers=max(1, os.cpu_count() or 1),
                              caption_turn=cfg.caption_turn, shuffled_captions=cfg.shuffled_captions,
                              train_mix=training_mix(cfg))
    timings["data"] = round(time.time() - t, 1)
    with open(paths["test"], encoding="utf-8") as handle:
        test_records = json.load(handle)
    report["data"] = {"train_images": cfg.n_train, "train_turns": cfg.turns, "test_questions": len(test_records),
                      "test_images": cfg.n_test_images, "test_types": {
                          q: sum(r["info"]["type"] == q for r in test_records) for q in task.QUESTION_TYPES}}
    answers = {}
    for r in test_records:
        answers.setdefault(r["info"]["type"], {}).setdefault(r["conversations"][1]["value"], 0)
        answers[r["info"]["type"]][r["conversations"][1]["value"]] += 1
    # The best an image-blind model can do: the most frequent answer of each question type.
    report["chance"] = sum(max(v.values()) for v in answers.values()) / len(test_records)
    log(f"data: {timings['data']}s, {report['data']}, image-blind majority accuracy {report['chance']:.3f}")
    if cfg.device == "cuda":  # after the image workers were forked
        report["device_name"] = torch.cuda.get_device_name(0)
        if cfg.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # 2. models from scratch
    t = time.time()
    paths["clip"] = build_study_clip(cfg, os.path.join(work, "clip"))
    trainer = Trainer(cfg, paths, work, log)
    report["commands"] = trainer.commands
    evaluator = Evaluator(cfg, test_records, paths["image_folder"], log)
    dense_dir = os.path.join(work, "llava-dense")
    if cfg.dense_from:
        # A dense model trained and exported by an earlier call (same --work, so the tower
        # path in its config is this CLIP, rebuilt from the same seed).
        import_dense(cfg.dense_from, dense_dir, report, log, cfg)
        if cfg.continue_finetune:
            continue_dense(cfg, paths, log, report, trainer, dense_dir, deadline)
    else:
        train_dense(cfg, paths, work, log, report, trainer, evaluator, dense_dir, deadline)
    timings["build_and_dense_training"] = round(time.time() - t, 1)

    # 5 + 6. distillation runs (background) while the training-free evaluations run
    jobs: List = list(BUDGETS) + (["control"] if cfg.dense_control else [])
    ds_steps = cfg.distill_steps
    if deadline:
        ft_step = (fine_tuning_step_seconds(report["training"])
                   or fine_tuning_step_seconds(earlier_training(report)) or 0.2)
        # Teacher pass, runs sharing the GPU and the CPU (data loading): assume 2.5 x slower.
        step = max(0.15, 2.5 * ft_step)
        waves = math.ceil(len(BUDGETS) / max(1, cfg.parallel))
        left = min(cfg.distill_time, deadline - log.elapsed() - 30 - 25) / waves - 25  # 25: start-up
        ds_steps = steps_for(left, step, cfg.distill_steps, 20)
        log(f"distillation: ~{step:.3f}s/step, {left:.0f}s -> {ds_steps} steps per budget")
    queue = list(jobs)
    running: Dict = {}

    def launch_next():  # the control has no teacher: it runs beside the `parallel` distillation runs
        while queue and len(running) < cfg.parallel + ("control" in jobs):
            job = queue.pop(0)
            student = (["--sparse", "False"] if job == "control" else
                       ["--retain_tokens", str(job), "--teacher_model_name_or_path", dense_dir,
                        "--align_loss_weight", f"{cfg.align_loss_weight:g}"])
            running[job] = trainer.start(f"distill-{job}", trainer.flags(
                model=dense_dir, version="v1", data=paths["distill"], out=os.path.join(work, f"llava-distill-{job}"),
                steps=ds_steps, lr=cfg.distill_lr, workers=cfg.distill_workers,
                save_steps=max(10, ds_steps // 4) if deadline else 0) + student)

    if cfg.stop_after != "dense":
        launch_next()
    results = report["results"]
    t = time.time()
    loaded = evaluator.load(dense_dir)
    results["dense"] = evaluator.evaluate(loaded, "dense", None)
    log(f"dense: {results['dense']['accuracy']:.4f} {results['dense']['per_type']}")
    if cfg.stop_after == "dense":
        for run in running.values():
            run.kill()
        export_dense(dense_dir, out, log)
        return
    for method in METHODS:
        results[method] = {}
        for budget in BUDGETS:
            entry = evaluator.evaluate(loaded, method, budget)
            entry["agreement_with_dense"] = agreement(entry, results["dense"])
            results[method][str(budget)] = entry
            log(f"{method} @ {budget}: {entry['accuracy']:.4f} flops {entry['flops_vs_dense']:.3f} "
                f"({entry['seconds']}s) {entry['per_type']}")
            for b, run in list(running.items()):  # keep the distillation queue moving
                if run.proc.poll() is not None:
                    report["training"][f"distill-{b}"] = trainer.finish(running.pop(b))
            launch_next()
        write_report(out, report)
    del loaded
    timings["eval_training_free"] = round(time.time() - t, 1)

    results["sparsevlm_distilled"] = {}
    while running or queue:
        for b, run in list(running.items()):
            try:
                report["training"][f"distill-{b}"] = trainer.finish(running.pop(b),
                                                                    kill_at=deadline - 35 if deadline else None)
            except RuntimeError as error:  # one budget's failure leaves the others
                report["training"][f"distill-{b}"] = {"error": str(error)[-3000:]}
                log(f"distill-{b} failed: {error}")
        launch_next()
    for job in jobs:
        if "error" in report["training"].get(f"distill-{job}", {}):
            continue
        loaded = evaluator.load(os.path.join(work, f"llava-distill-{job}"))
        if job == "control":
            entry = results["dense_control"] = evaluator.evaluate(loaded, "dense", None)
        else:
            entry = results["sparsevlm_distilled"][str(job)] = evaluator.evaluate(loaded, "sparsevlm", job)
        entry["agreement_with_dense"] = agreement(entry, results["dense"])
        log(f"distill-{job}: {entry['accuracy']:.4f} {entry['per_type']}")
        del loaded
    dense_acc = results["dense"]["accuracy"]
    report["summary"] = {
        "dense_accuracy": dense_acc,
        "dense_reaches_90": dense_acc >= 0.9,
        "distilled_over_dense": {b: results["sparsevlm_distilled"][str(b)]["accuracy"] / max(dense_acc, 1e-9)
                                 for b in BUDGETS if str(b) in results["sparsevlm_distilled"]},
        "dense_control_accuracy": results.get("dense_control", {}).get("accuracy"),
        "distilled_over_dense_control": {
            b: results["sparsevlm_distilled"][str(b)]["accuracy"] / max(results["dense_control"]["accuracy"], 1e-9)
            for b in BUDGETS if str(b) in results["sparsevlm_distilled"] and "dense_control" in results},
        "sparsevlm_minus_random_at_64": results["sparsevlm"]["64"]["accuracy"] - results["random"]["64"]["accuracy"],
        "sparsevlm_minus_fastv_at_64": (results["sparsevlm"]["64"]["accuracy"]
                                        - results["fastv"]["64"]["accuracy"]),
    }
    log("summary:", report["summary"])


if __name__ == "__main__":
    sys.exit(main())
