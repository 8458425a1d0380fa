#!/usr/bin/env python3
"""Benchmark of the fast path (issue 17): time to first token, decode and an eval loop at batch
1 and 8, dense upstream vs the plugin, eager vs `cuda_graphs=True`, in one process.

Models (from `benchmarks/bench_gpu.py`'s builders): LLaVA-1.5-7B shapes (32 layers, hidden 4096,
vocab 32000) with random bf16 weights built from upstream's classes on the GPU, a random CLIP
ViT-L/14-336 + CLIPImageProcessor saved to a temp folder (576 visual tokens), mlp2x_gelu
projector. Tokenizer: a word-level `PreTrainedTokenizerFast` of exactly the model's vocabulary
(built offline with `tokenizers`; no sentencepiece needed), so upstream's conv template
"vicuna_v1" + `tokenizer_image_token` make real prompts whose question lengths are exact token
counts. Images: random-noise JPEGs of photo sizes (640x480 and the like) in a temp folder, read
and preprocessed by upstream's `process_images` (pad to square, 336 px) inside the timings.
With --tiny: bench_gpu's tiny shapes (16 layers, hidden 64, vocab 1000, tiny CLIP, 576 tokens),
fp32 on the CPU with one intra-op thread, where the fast path runs its fixed-shape code eagerly
(no capture): 4 eval prompts, 32 (batch 1) / 16 (batch 8) decode tokens, 1 TTFT repeat, no
DataLoader workers; every section runs, ratios are reported, targets are not judged.
Every model call runs under torch.inference_mode(), as upstream's eval scripts do.

Only the public API is used (`enable` / `disable` / `last_stats` / `last_keep_mask`) and
upstream's own calls. Configurations:
  1 dense_eager   `sparsevlm_patch.disable(model)`: upstream exactly (what users have)
  2 plugin_eager  `enable(model, retain_tokens=64)`
  3 plugin_fast   `enable(model, retain_tokens=64, cuda_graphs=True)`
  4 dense_fast    `enable(model, keep_schedule=(576, 576, 576), cuda_graphs=True)`: nothing pruned,
                  the same capture (what capture alone earns; 3 vs 4 = what pruning earns)

Sections, in order (each is skipped as "skipped_budget" when --budget-s has too little left):
- build: models, tokenizer, images, prompts.
- correctness: plugin eager (2) vs fast path (3), retain 64, batch 1 and 8: greedy
  `generate(max_new_tokens=32, min_new_tokens=32, output_scores=True)` twice on the fast path
  (first call captures): identical keep masks (`last_keep_mask`), identical tokens, or, where
  a bf16 near-tie flips a token, the first divergence step per sample with both runs' logits
  of both tokens (passes when the two logits are within 2% of the row's largest |logit| in both
  runs); prefill logits of `model(ids, images=..., use_cache=True)` at the last position
  within 1e-2 relative (L2, per sample) and keep masks equal there too; the fast path's
  `last_stats()["fast_path"]["path"]` is "captured" on a GPU. A failed check makes the run
  exit 1 at the end (after the JSON is written); so does an error in any section.
- bandwidth: HBM bandwidth = 2 * bytes / time of a 4 GiB device-to-device copy (CUDA events,
  median of 10); weight-streaming limit = the model's weight bytes (every parameter but the
  vision tower's: what one decode step reads) / bandwidth.
- config_<name> for each of the 4 configurations, in this order (each starts from a fresh
  `enable()` / `disable()`, which drops the fast path's graphs):
  * eval loop, timed whole and first, so capture and warm-up are INCLUDED: shaped like
    upstream's `llava.eval.model_vqa_loader` (the same per-item work as its CustomDataset:
    conv template, `Image.open(...).convert('RGB')`, `process_images`, `tokenizer_image_token`,
    in a torch DataLoader with its 4 workers, batch 1; then its `generate` call, greedy,
    `max_new_tokens=8`, and `batch_decode`), 64 prompts whose question lengths spread evenly
    over 20-80 tokens (shuffled), one image each;
  * time to first token: `generate(max_new_tokens=1)` from raw PIL images, `process_images`
    and the host-to-device copy included, batch 1 and 8 (8 prompts of the same length, no
    pads); median of warmed-up repeats, synchronised wall time;
  * decode ms per token at batch 1: (generate(129 new tokens) - generate(1)) / 128, both with
    `min_new_tokens` = max_new_tokens so that exactly that many tokens come out, on
    preprocessed image tensors;
  * stage split at batch 1 (synchronised wall-time medians): preprocess = `process_images` +
    copy to the device; vision = `model.encode_images(images)` (tower + projector; the
    hooked, captured one on the fast path); splice = `model.prepare_inputs_labels_for_multimodal`
    (called on its own; includes its own encode_images) minus vision; LM prefill = generate(1)
    on the preprocessed tensors minus that prepare call (the rest: prefill, LM head, generate's
    overhead); decode = 7 x decode ms per token (the rest of an 8-token answer);
  * `last_stats(model)["fast_path"]` after the eval loop and at the end (graphs, prefill
    shapes, capture seconds, graph memory).
- runner: upstream's own `llava.eval.model_vqa_loader` on the same 64 prompts (question jsonl
  {"question_id", "image", "text"}, the image folder, `--conv-mode vicuna_v1 --max_new_tokens 8`)
  as subprocesses of `python -m sparsevlm_patch.run [--cuda-graphs] -m llava.eval.model_vqa_loader
  ...` with SPARSEVLM_RETAIN=64: eager --temperature 0, --cuda-graphs --temperature 0, and
  --cuda-graphs with the script's DEFAULT temperature (0.2, sampling); then, budget permitting,
  plain upstream `python -m llava.eval.model_vqa_loader` (dense baseline). Upstream's loader
  loads the model in fp16 with device_map="auto" from a folder whose name contains "llava":
  the random 7B is saved there first with `save_pretrained` in bf16 (~14 GB of disk in the
  temp folder, ~30 s; deleted at the end). Each run: wall time (imports and model load
  included), the loop time from tqdm's final line (elapsed, 1 s resolution; and its smoothed rate:
  the steady per-prompt time), the answers file's line count (check: 64),
  the runner's summary from stderr (check: "layer 2: 66.0, layer 6: 30.0, layer 15: 17.0" for
  the plugin runs) and its fast-path line. The script needs `shortuuid`: the device wheels must
  include it (`bash ../shared/tools/device-wheels.sh shortuuid==1.0.13`, or add it to that
  script's list). With --tiny this section prepares the folder, question file and images, loads
  the folder with upstream's `load_pretrained_model` on the CPU and runs the --cuda-graphs
  command, which must get as far as upstream's first hard-coded CUDA call (two checks), then
  records "skipped_on_cpu": upstream's script can't run further without a GPU.
- decode_b8_<name>: decode ms per token at batch 8 (if time allows).
Dense eager runs upstream's attention as it is: with torch 2.11 on an H100/H200 SDPA picks cuDNN
attention, which plans anew for every new key length (bench_gpu's decode_cold: 100+ ms per step
on an H200); the warmed-up TTFT/decode repeats don't pay that, the eval loop (prompt lengths vary,
capture and warm-up included) does, for dense_eager and for plugin_eager's dense first layers.
Then ratios to dense_eager (speedup = dense time / config time) and the issue's targets
(reported pass/fail; they never change the exit code; with --tiny they are not judged):
TTFT b1 >= 2.5x, TTFT b8 >= 3.0x, decode b1 <= 2x the streaming limit, eval loop >= 2.5x,
plugin_fast vs dense_fast TTFT b1 >= 1.5x.

Outputs under --out (default $OUT, else ./out): bench_fast.json (everything: meta with device,
torch / transformers / llava versions, date, --label; checks; errors; sections with status
and seconds; skipped), bench_fast.png (stacked stages at batch 1 for the 4 configurations;
matplotlib Agg; if matplotlib is missing the JSON still has the numbers and
`bench_fast.py --plot-from bench_fast.json` draws it elsewhere); a table printed last.

Device command (from the repo root; wheels from `bash ../shared/tools/device-wheels.sh shortuuid==1.0.13`,
carry .whl; --budget-s 490 by default keeps the whole call under ~9 minutes, one device command may
run 10; ~14 GB of the machine's disk for the saved model, deleted at the end):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
      && python3 benchmarks/bench_fast.py --label <commit>
CPU smoke test with tiny shapes (well under 2 minutes; tests/test_bench_fast_smoke.py runs it):
    .venv/bin/python benchmarks/bench_fast.py --tiny --out /tmp/bench_fast_tiny
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import sparsevlm_patch  # noqa: E402  (installs the hooks before llava is imported)
import bench_gpu as bg  # noqa: E402  (model builders: build_clip, build_llava, Ctx, timed, summary)

IMAGE_TOKEN_INDEX = -200
CONV_MODE = "vicuna_v1"
RETAIN = 64
KEPT_64 = "layer 2: 66.0, layer 6: 30.0, layer 15: 17.0"  # the runner's summary at retain 64
CONFIGS = ("dense_eager", "plugin_eager", "plugin_fast", "dense_fast")
CONFIG_CALLS = {
    "dense_eager": "sparsevlm_patch.disable(model)",
    "plugin_eager": "sparsevlm_patch.enable(model, retain_tokens=64)",
    "plugin_fast": "sparsevlm_patch.enable(model, retain_tokens=64, cuda_graphs=True)",
    "dense_fast": "sparsevlm_patch.enable(model, keep_schedule=(576, 576, 576), cuda_graphs=True)",
}
FAST_CONFIGS = ("plugin_fast", "dense_fast")
TARGETS = {  # name: (description, comparison, threshold)
    "ttft_b1_speedup": ("plugin_fast TTFT batch 1, x dense_eager", ">=", 2.5),
    "ttft_b8_speedup": ("plugin_fast TTFT batch 8, x dense_eager", ">=", 3.0),
    "decode_b1_over_streaming_limit": ("plugin_fast decode ms/token batch 1 / weight-streaming limit", "<=", 2.0),
    "eval_loop_speedup": ("plugin_fast eval loop (capture included), x dense_eager", ">=", 2.5),
    "pruning_ttft_b1_speedup": ("plugin_fast vs dense_fast TTFT batch 1 (what pruning earns)", ">=", 1.5),
}
TIE_FRACTION = 0.02  # a flipped token is a bf16 tie when its two logits are this close (of max |logit|)
LOGITS_TOLERANCE = 1e-2  # relative L2 error of the last position's prefill logits


def set_config(model, name: str):
    if name == "dense_eager":
        sparsevlm_patch.disable(model)
    elif name == "plugin_eager":
        sparsevlm_patch.enable(model, retain_tokens=RETAIN)
    elif name == "plugin_fast":
        sparsevlm_patch.enable(model, retain_tokens=RETAIN, cuda_graphs=True)
    elif name == "dense_fast":
        sparsevlm_patch.enable(model, keep_schedule=(576, 576, 576), cuda_graphs=True)
    else:
        raise ValueError(name)


# ----------------------------------------------------------------------------- run context

class SkipSection(Exception):
    """Raised by a section that can't run here (its reason goes into the JSON)."""

    def __init__(self, reason: str, note: str = ""):
        super().__init__(reason)
        self.reason, self.note = reason, note


class Ctx(bg.Ctx):
    """bench_gpu's run context (device, dtype, timers, temp folder), writing bench_fast.json."""

    def __init__(self, args):
        super().__init__(args)
        if args.dtype == "float32":  # tells bf16 rounding apart from a real eager/fast difference
            self.dtype = torch.float32
        self.results.update({"sections": {}, "skipped": {}, "configs": {}})
        self.n_prompts = args.prompts or (4 if self.tiny else 64)
        # new tokens timed for decode per batch (tiny: enough that decode outweighs the CPU's noise at batch 1)
        self.decode_tokens = {1: 32, 8: 16} if self.tiny else {1: 128, 8: 128}
        self.answer_tokens = 8
        self.correct_tokens = 32
        self.ttft_reps, self.ttft_warmup = (1, 1) if self.tiny else (7, 2)
        self.decode_reps = {1: 3, 8: 2}  # after one warm-up call each
        self.stage_reps = 1 if self.tiny else 7
        self.workers = 0 if self.tiny else 4
        if self.tiny:
            # The smoke test shares 2 busy cores: one intra-op thread keeps it fast and steady.
            torch.set_num_threads(1)

    def save(self):
        path = os.path.join(self.out_dir, "bench_fast.json")
        with open(path + ".tmp", "w") as handle:
            json.dump(self.results, handle, indent=1, default=str)
        os.replace(path + ".tmp", path)


def section(ctx: Ctx, name: str, fn, *args, need_s: float = 0.0):
    """Run one section: errors are recorded, not fatal; skipped ("skipped_budget") when less
    time is left than it needs (need_s counts on the GPU only)."""
    need = 0.0 if ctx.tiny else need_s
    record = ctx.results["sections"][name] = {"status": "running", "need_s": need}
    if ctx.left() < need:
        ctx.log(f"SKIP {name}: {ctx.left():.0f} s left, needs ~{need:.0f} s")
        record["status"] = ctx.results["skipped"][name] = "skipped_budget"
        ctx.save()
        return None
    ctx.log(f"== {name}")
    t0 = time.perf_counter()
    try:
        out = fn(ctx, *args)
        record["status"] = "ok"
        return out
    except SkipSection as skip:
        ctx.log(f"SKIP {name}: {skip.reason} {skip.note}")
        record["status"] = ctx.results["skipped"][name] = skip.reason
        record["note"] = skip.note
        return None
    except Exception as exc:  # keep going: the other sections still report
        ctx.log(f"ERROR in {name}: {exc!r}")
        traceback.print_exc()
        record["status"] = "error"
        ctx.results["errors"].append({"section": name, "error": repr(exc),
                                      "traceback": traceback.format_exc()[-4000:]})
        return None
    finally:
        record["seconds"] = round(time.perf_counter() - t0, 1)
        ctx.save()


def check(ctx: Ctx, name: str, ok: bool) -> bool:
    ctx.results["checks"][name] = bool(ok)
    if not ok:
        ctx.log(f"CHECK FAILED: {name}")
    return bool(ok)


def wall(ctx: Ctx, fn):
    """(synchronised wall ms, output) of one call."""
    ctx.sync()
    t0 = time.perf_counter()
    out = fn()
    ctx.sync()
    return (time.perf_counter() - t0) * 1e3, out


def repeat(ctx: Ctx, fn, reps: int, warmup: int, keep_first: bool = False) -> dict:
    """Median (bench_gpu.summary) of `reps` synchronised calls after `warmup` calls."""
    first = None
    for i in range(warmup):
        out = fn()
        if i == 0 and keep_first:
            first = out
    times = [wall(ctx, fn)[0] for _ in range(reps)]
    res = bg.summary(times)
    res["all_ms"] = [round(t, 3) for t in times]
    if keep_first:
        res["first_output"] = first
    return res


def package_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001  (metadata missing: not worth failing a run for)
        return None


def git_head():
    """The checkout's commit, where there is one (the device machine's copy may have no .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def fast_report(model):
    stats = sparsevlm_patch.last_stats(model)
    return None if not stats else stats.get("fast_path")


# ----------------------------------------------------------------------------- data

def build_tokenizer(vocab_size: int, folder: str):
    """A word-level fast tokenizer of exactly `vocab_size` ids: <unk>/<s>/</s> = 0/1/2, the
    words of the vicuna_v1 template, then "w0", "w1", ... (one token each). BOS is added as a
    Llama tokenizer does, so upstream's `tokenizer_image_token` keeps it once."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from llava.conversation import conv_templates

    specials = ["<unk>", "<s>", "</s>"]
    split = pre_tokenizers.Whitespace()
    template = conv_templates[CONV_MODE].system + " USER: ASSISTANT: ?\n.,'"
    words = []
    for piece, _ in split.pre_tokenize_str(template):
        if piece not in words and piece not in specials:
            words.append(piece)
    i = 0
    while len(specials) + len(words) < vocab_size:
        word = f"w{i}"
        i += 1
        if word not in words:
            words.append(word)
    vocab = {token: k for k, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = split
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<unk>", model_max_length=2048,
                                        padding_side="right")
    tokenizer.save_pretrained(folder)
    assert len(tokenizer) == vocab_size, len(tokenizer)
    return tokenizer


def question_text(rng: random.Random, n_tokens: int, vocab_size: int) -> str:
    """A question of exactly n_tokens tokens: n_tokens - 1 words and a '?'."""
    return " ".join(f"w{rng.randrange(0, vocab_size - 200)}" for _ in range(n_tokens - 1)) + " ?"


def conv_prompt(question: str) -> str:
    """The prompt upstream's model_vqa_loader builds (mm_use_im_start_end False)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    conv = conv_templates[CONV_MODE].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    from llava.mm_utils import tokenizer_image_token

    return tokenizer_image_token(conv_prompt(question), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


def make_images(folder: str, n: int, seed: int = 0) -> list:
    """n random-noise JPEGs of photo sizes; returns their file names."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    sizes = [(640, 480), (500, 375), (480, 640), (640, 427), (612, 612), (375, 500)]
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        # smooth-ish noise (a small random image scaled up), so JPEG sizes are photo-like
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        name = f"img_{i:05d}.jpg"
        image.save(os.path.join(folder, name), quality=90)
        names.append(name)
    return names


class EvalDataset(torch.utils.data.Dataset):
    """The per-item work of upstream's model_vqa_loader.CustomDataset (batch 1): prompt from
    the conv template, image read from disk, `process_images`, `tokenizer_image_token`."""

    def __init__(self, questions, image_folder, tokenizer, image_processor, model_config):
        self.questions, self.image_folder = questions, image_folder
        self.tokenizer, self.image_processor, self.model_config = tokenizer, image_processor, model_config

    def __getitem__(self, index):
        from PIL import Image

        from llava.mm_utils import process_images

        line = self.questions[index]
        image = Image.open(os.path.join(self.image_folder, line["image"])).convert("RGB")
        image_tensor = process_images([image], self.image_processor, self.model_config)[0]
        return prompt_ids(self.tokenizer, line["text"]), image_tensor, image.size

    def __len__(self):
        return len(self.questions)


def collate(batch):
    input_ids, image_tensors, image_sizes = zip(*batch)
    return torch.stack(input_ids), torch.stack(image_tensors), image_sizes


# ----------------------------------------------------------------------------- sections

def section_build(ctx: Ctx):
    from PIL import Image

    size = "tiny" if ctx.tiny else "7b"
    clip_dir = bg.build_clip(ctx)
    ctx.model = bg.build_llava(ctx, size, clip_dir)
    model = ctx.model
    vocab = model.config.vocab_size
    ctx.tokenizer = build_tokenizer(vocab, os.path.join(ctx.tmp, "tokenizer"))
    ctx.image_processor = model.get_vision_tower().image_processor
    ctx.image_folder = os.path.join(ctx.tmp, "images")
    n_images = max(ctx.n_prompts, 8)
    names = make_images(ctx.image_folder, n_images)
    ctx.pil = [Image.open(os.path.join(ctx.image_folder, name)).convert("RGB") for name in names[:8]]
    for image in ctx.pil:
        image.load()
    # the eval loop's prompts: question lengths spread evenly over 20-80 tokens, shuffled
    rng = random.Random(17)
    lengths = [20 + round(60 * i / max(1, ctx.n_prompts - 1)) for i in range(ctx.n_prompts)]
    rng.shuffle(lengths)
    ctx.questions = [{"question_id": i, "image": names[i], "text": question_text(rng, n, vocab)}
                     for i, n in enumerate(lengths)]
    question_tokens = [len(ctx.tokenizer(q["text"], add_special_tokens=False).input_ids) for q in ctx.questions]
    check(ctx, "build/question_lengths_exact", question_tokens == lengths)
    # TTFT / decode prompts: 8 questions of 56 tokens (as bench_gpu's), same length: no pads
    fixed = [prompt_ids(ctx.tokenizer, question_text(random.Random(1000 + i), 56, vocab)) for i in range(8)]
    ctx.fixed_ids = torch.stack(fixed).to(ctx.device)
    params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.get_vision_tower().parameters())
    ctx.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) \
        - sum(p.numel() * p.element_size() for p in model.get_vision_tower().parameters())
    ctx.results["model"] = {
        "shape": size, "dtype": str(ctx.dtype), "device": str(ctx.device), "parameters": params,
        "vision_tower_parameters": vision, "weight_bytes_without_vision_tower": ctx.weight_bytes,
        "vocab": vocab, "layers": model.config.num_hidden_layers,
        "eval_prompts": ctx.n_prompts, "eval_question_tokens": lengths,
        "eval_prompt_tokens": [len(prompt_ids(ctx.tokenizer, q["text"])) for q in ctx.questions],
        "fixed_prompt_tokens": int(ctx.fixed_ids.shape[1]),
        "image_sizes": sorted({image.size for image in ctx.pil}),
    }
    ctx.log(f"built {size}: {params / 1e9:.2f} B parameters, prompts {ctx.n_prompts}, "
            f"fixed prompt {ctx.fixed_ids.shape[1]} tokens")


def pil_batch(ctx: Ctx, batch: int):
    images = [ctx.pil[i % len(ctx.pil)] for i in range(batch)]
    return images, [image.size for image in images]


def preprocess(ctx: Ctx, images):
    from llava.mm_utils import process_images

    return process_images(images, ctx.image_processor, ctx.model.config).to(ctx.device, ctx.dtype)


def generate(ctx: Ctx, ids, images, sizes, new_tokens: int, exact: bool = True, **kw):
    extra = {"min_new_tokens": new_tokens} if exact else {}
    return ctx.model.generate(ids, images=images, image_sizes=sizes, do_sample=False, num_beams=1,
                              max_new_tokens=new_tokens, use_cache=True, pad_token_id=0, **extra, **kw)


def compare_generations(eager, fast, tolerance_fraction: float) -> dict:
    """Per sample: identical tokens, or the first divergence with both runs' logits of both
    tokens and whether it is a near-tie in both runs."""
    # the new tokens only: generate() returns what it started from (4.37: a BOS column) first
    seq_e = eager.sequences[:, eager.sequences.shape[1] - len(eager.scores):].cpu()
    seq_f = fast.sequences[:, fast.sequences.shape[1] - len(fast.scores):].cpu()
    out = {"identical": bool(torch.equal(seq_e, seq_f)), "samples": []}
    all_ok = out["identical"]
    if not out["identical"]:
        all_ok = seq_e.shape == seq_f.shape
        for b in range(seq_e.shape[0]):
            diff = (seq_e[b] != seq_f[b]).nonzero()
            if len(diff) == 0:
                out["samples"].append({"sample": b, "identical": True})
                continue
            step = int(diff[0])
            te, tf = int(seq_e[b, step]), int(seq_f[b, step])
            row_e, row_f = eager.scores[step][b].float().cpu(), fast.scores[step][b].float().cpu()
            tol_e = tolerance_fraction * float(row_e[torch.isfinite(row_e)].abs().max())
            tol_f = tolerance_fraction * float(row_f[torch.isfinite(row_f)].abs().max())
            gap_e, gap_f = float(row_e[te] - row_e[tf]), float(row_f[tf] - row_f[te])
            tie = abs(gap_e) <= tol_e and abs(gap_f) <= tol_f
            all_ok = all_ok and tie
            out["samples"].append({
                "sample": b, "identical": False, "first_divergence_step": step,
                "eager_token": te, "fast_token": tf,
                "eager_logits": {"eager_token": float(row_e[te]), "fast_token": float(row_e[tf])},
                "fast_logits": {"eager_token": float(row_f[te]), "fast_token": float(row_f[tf])},
                "gap_eager": gap_e, "gap_fast": gap_f, "tie_tolerance": [tol_e, tol_f], "bf16_tie": tie})
    out["ok"] = bool(all_ok)
    return out


def section_correctness(ctx: Ctx):
    model = ctx.model
    res = ctx.results["correctness"] = {"new_tokens": ctx.correct_tokens, "tie_fraction": TIE_FRACTION,
                                        "logits_tolerance": LOGITS_TOLERANCE}
    for batch in (1, 8):
        ids = ctx.fixed_ids[:batch]
        pil, sizes = pil_batch(ctx, batch)
        entry = res[f"b{batch}"] = {}
        with torch.inference_mode():
            images = preprocess(ctx, pil)
            runs = {}
            for name in ("plugin_eager", "plugin_fast"):
                set_config(model, name)
                outs, masks = [], []
                for _ in range(2 if name == "plugin_fast" else 1):
                    outs.append(generate(ctx, ids, images, sizes, ctx.correct_tokens, output_scores=True,
                                         return_dict_in_generate=True))
                    masks.append(sparsevlm_patch.last_keep_mask(model).clone())
                stats = sparsevlm_patch.last_stats(model)
                logits = model(ids, images=images, image_sizes=sizes, use_cache=True).logits[:, -1].float()
                runs[name] = {"outs": outs, "masks": masks, "logits": logits,
                              "forward_mask": sparsevlm_patch.last_keep_mask(model).clone(),
                              "kept_visual": stats["kept_visual"], "fast_path": stats.get("fast_path")}
        e, f = runs["plugin_eager"], runs["plugin_fast"]
        entry["kept_visual_eager"], entry["kept_visual_fast"] = e["kept_visual"], f["kept_visual"]
        entry["fast_path"] = f["fast_path"]
        entry["generated_tokens"] = [len(e["outs"][0].scores), len(f["outs"][0].scores)]
        check(ctx, f"correctness/b{batch}/generates_{ctx.correct_tokens}_tokens",
              entry["generated_tokens"] == [ctx.correct_tokens] * 2)
        entry["keep_masks_equal_generate"] = bool(torch.equal(e["masks"][0], f["masks"][0])
                                                  and torch.equal(f["masks"][0], f["masks"][1]))
        entry["keep_masks_equal_forward"] = bool(torch.equal(e["forward_mask"], f["forward_mask"]))
        if not entry["keep_masks_equal_generate"]:
            entry["keep_mask_agreement"] = float((e["masks"][0] == f["masks"][0]).float().mean())
        entry["tokens_first_replay"] = compare_generations(e["outs"][0], f["outs"][0], TIE_FRACTION)
        entry["tokens_second_replay"] = compare_generations(e["outs"][0], f["outs"][1], TIE_FRACTION)
        entry["replays_identical"] = bool(torch.equal(f["outs"][0].sequences, f["outs"][1].sequences))
        rel = ((e["logits"] - f["logits"]).norm(dim=-1) / e["logits"].norm(dim=-1)).tolist()
        entry["prefill_logits_rel_err"] = rel
        entry["prefill_logits_max_rel_err"] = max(rel)
        check(ctx, f"correctness/b{batch}/keep_masks_equal", entry["keep_masks_equal_generate"]
              and entry["keep_masks_equal_forward"])
        check(ctx, f"correctness/b{batch}/tokens_equal_or_bf16_tie",
              entry["tokens_first_replay"]["ok"] and entry["tokens_second_replay"]["ok"])
        check(ctx, f"correctness/b{batch}/prefill_logits_within_1e-2", max(rel) <= LOGITS_TOLERANCE)
        check(ctx, f"correctness/b{batch}/kept_visual_equal", e["kept_visual"] == f["kept_visual"])
        expected_path = "captured" if ctx.cuda else "fixed-shape, eager"
        check(ctx, f"correctness/b{batch}/fast_path_{expected_path.split(',')[0]}",
              bool(f["fast_path"]) and f["fast_path"].get("path") == expected_path)
        ctx.log(f"b{batch}: masks equal {entry['keep_masks_equal_generate']}, tokens identical "
                f"{entry['tokens_first_replay']['identical']}, logits rel err {max(rel):.2e}")


def section_bandwidth(ctx: Ctx):
    n = (64 if ctx.tiny else 4096) * 2 ** 20
    src = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = [bg.timed(ctx, lambda: dst.copy_(src))[0] for _ in range(10)]
    del src, dst
    if ctx.cuda:
        torch.cuda.empty_cache()
    median = statistics.median(times)
    bandwidth = 2 * n / (median / 1e3)
    limit_ms = ctx.weight_bytes / bandwidth * 1e3
    ctx.results["bandwidth"] = {
        "copy_bytes": n, "copy_ms": [round(t, 4) for t in times], "copy_median_ms": median,
        "bandwidth_gb_s": bandwidth / 1e9, "best_bandwidth_gb_s": 2 * n / (min(times) / 1e3) / 1e9,
        "weight_bytes": ctx.weight_bytes, "streaming_limit_ms": limit_ms,
        "method": "2 * bytes / median time of a device-to-device copy (read + write); limit = weight bytes "
                  "(all parameters but the vision tower's) / bandwidth"}
    ctx.streaming_limit_ms = limit_ms
    ctx.log(f"bandwidth {bandwidth / 1e9:.0f} GB/s, weights {ctx.weight_bytes / 1e9:.2f} GB, "
            f"streaming limit {limit_ms:.2f} ms/token")


def eval_loop(ctx: Ctx) -> dict:
    """Upstream model_vqa_loader's loop (batch 1, its generate call, greedy, 8 new tokens)."""
    model = ctx.model
    dataset = EvalDataset(ctx.questions, ctx.image_folder, ctx.tokenizer, ctx.image_processor, model.config)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=ctx.workers, shuffle=False,
                                         collate_fn=collate)
    per_prompt, answers, lengths = [], [], []
    ctx.sync()
    t0 = time.perf_counter()
    for input_ids, image_tensor, image_sizes in loader:
        t1 = time.perf_counter()
        input_ids = input_ids.to(device=ctx.device, non_blocking=True)
        with torch.inference_mode():
            output_ids = model.generate(input_ids, images=image_tensor.to(dtype=ctx.dtype, device=ctx.device,
                                                                          non_blocking=True),
                                        image_sizes=image_sizes, do_sample=False, temperature=0, top_p=None,
                                        num_beams=1, max_new_tokens=ctx.answer_tokens, use_cache=True,
                                        pad_token_id=0)
        answers.append(ctx.tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip())
        lengths.append(int(output_ids.shape[1]))
        per_prompt.append((time.perf_counter() - t1) * 1e3)
    ctx.sync()
    total = time.perf_counter() - t0
    return {"total_s": total, "prompts": len(per_prompt), "per_prompt_ms": [round(t, 2) for t in per_prompt],
            "first_prompt_ms": per_prompt[0], "median_prompt_ms": statistics.median(per_prompt),
            "output_lengths": lengths, "answers_sample": answers[:3], "workers": ctx.workers}


def section_config(ctx: Ctx, name: str):
    model = ctx.model
    entry = ctx.results["configs"][name] = {"call": CONFIG_CALLS[name]}
    set_config(model, name)  # fresh: no graphs, nothing warmed for this configuration
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    entry["eval_loop"] = eval_loop(ctx)
    ctx.log(f"{name}: eval loop {entry['eval_loop']['total_s']:.2f} s "
            f"({entry['eval_loop']['prompts']} prompts, first {entry['eval_loop']['first_prompt_ms']:.0f} ms)")
    if name in FAST_CONFIGS:
        entry["fast_path_after_eval_loop"] = fast_report(model)
    with torch.inference_mode():
        for batch in (1, 8):
            ids = ctx.fixed_ids[:batch]
            pil, sizes = pil_batch(ctx, batch)
            entry[f"ttft_b{batch}"] = repeat(
                ctx, lambda: generate(ctx, ids, preprocess(ctx, pil), sizes, 1), ctx.ttft_reps, ctx.ttft_warmup)
            if name in FAST_CONFIGS:
                entry[f"fast_path_b{batch}"] = fast_report(model)
        entry["decode_b1"] = decode(ctx, 1, name)
        entry["stages_b1"] = stages(ctx, entry["decode_b1"]["ms_per_token"])
        if name in FAST_CONFIGS:
            entry["fast_path"] = fast_report(model)
    if ctx.cuda:
        entry["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        entry["memory_reserved_gib"] = torch.cuda.memory_reserved() / 2 ** 30
    if name in FAST_CONFIGS:
        check(ctx, f"{name}/reports_fast_path", bool(entry["fast_path"]))
        # one captured prefill per (batch, length bucket, rater bucket), not one per prompt
        loop_shapes = (entry["fast_path_after_eval_loop"] or {}).get("prefill_shapes", 1e9)
        entry["eval_loop_prefill_shapes"] = loop_shapes
        check(ctx, f"{name}/eval_loop_prefill_shapes_bucketed", loop_shapes <= 6)
    ctx.log(f"{name}: TTFT b1 {entry['ttft_b1']['median_ms']:.1f} ms, b8 {entry['ttft_b8']['median_ms']:.1f} ms, "
            f"decode b1 {entry['decode_b1']['ms_per_token']:.2f} ms/token")


def section_profile_b8(ctx: Ctx):
    """Where the time of one batch-8 `generate(max_new_tokens=1)` goes, eager plugin against the
    fast path (run 2: the fast path's prefill was the slower one at batch 8): the kernels with the
    most device time (self time, kernels launched by a replayed graph included), after warm-up.
    On the CPU (--tiny) the same list holds the CPU ops."""
    from torch.profiler import ProfilerActivity, profile

    ids = ctx.fixed_ids[:8]
    pil, sizes = pil_batch(ctx, 8)
    out = ctx.results["profile_b8"] = {}
    for name in ("plugin_eager", "plugin_fast"):
        set_config(ctx.model, name)
        with torch.inference_mode():
            images = preprocess(ctx, pil)
            for _ in range(3):
                generate(ctx, ids, images, sizes, 1)
            ctx.sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
            with profile(activities=activities) as prof:
                generate(ctx, ids, images, sizes, 1)
                ctx.sync()
        # Device-side events only (kernels, copies, memsets): CPU ops would count their kernels twice.
        attr = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
        kind = "CUDA" if ctx.cuda else "CPU"
        events = sorted((e for e in prof.key_averages() if e.device_type.name == kind), key=lambda e: -getattr(e, attr))
        device_ms = sum(getattr(e, attr) for e in events) / 1e3
        out[name] = {"device_ms": round(device_ms, 2), "fast_path": fast_report(ctx.model),
                     "top": [{"name": e.key[:100], "calls": e.count, "ms": round(getattr(e, attr) / 1e3, 3)}
                             for e in events[:20]]}
        ctx.log(f"profile b8 {name}: {kind} time {device_ms:.1f} ms")
        for row in out[name]["top"][:12]:
            ctx.log(f"  {row['ms']:9.3f} ms  {row['calls']:5d}x  {row['name']}")


def decode(ctx: Ctx, batch: int, name: str) -> dict:
    """(generate(n + 1) - generate(1)) / n on preprocessed tensors, exactly n + 1 tokens out."""
    ids = ctx.fixed_ids[:batch]
    pil, sizes = pil_batch(ctx, batch)
    n, reps = ctx.decode_tokens[batch], ctx.decode_reps[batch]
    with torch.inference_mode():
        images = preprocess(ctx, pil)
        first = repeat(ctx, lambda: generate(ctx, ids, images, sizes, 1), reps, 1, keep_first=True)
        full = repeat(ctx, lambda: generate(ctx, ids, images, sizes, n + 1), reps, 1, keep_first=True)
    # generate() returns what it started from (transformers 4.37: one BOS column) + the new tokens
    generated = int(full.pop("first_output").shape[1] - first.pop("first_output").shape[1]) + 1
    per_token = (full["median_ms"] - first["median_ms"]) / n
    check(ctx, f"{name}/decode_b{batch}_generates_{n + 1}_tokens", generated == n + 1)
    return {"batch": batch, "new_tokens": n, "generated_tokens": generated, "generate_1_ms": first,
            f"generate_{n + 1}_ms": full, "ms_per_token": per_token, "tokens_per_s": batch * 1e3 / per_token
            if per_token > 0 else None}


def stages(ctx: Ctx, decode_ms_per_token: float) -> dict:
    model = ctx.model
    ids = ctx.fixed_ids[:1]
    pil, sizes = pil_batch(ctx, 1)
    images = preprocess(ctx, pil)
    reps, warm = ctx.stage_reps, 1
    pre = repeat(ctx, lambda: preprocess(ctx, pil), reps, warm)
    vision = repeat(ctx, lambda: model.encode_images(images), reps, warm)
    prepare = repeat(ctx, lambda: model.prepare_inputs_labels_for_multimodal(
        ids, None, None, None, None, images, image_sizes=sizes), reps, warm)
    gen1 = repeat(ctx, lambda: generate(ctx, ids, images, sizes, 1), reps, warm)
    out = {"preprocess_ms": pre["median_ms"], "vision_ms": vision["median_ms"],
           "prepare_ms": prepare["median_ms"], "generate_1_from_tensors_ms": gen1["median_ms"],
           "splice_ms": prepare["median_ms"] - vision["median_ms"],
           "lm_prefill_ms": gen1["median_ms"] - prepare["median_ms"],
           "decode_7_tokens_ms": 7 * decode_ms_per_token}
    out["plot"] = {"preprocess + vision tower/projector": out["preprocess_ms"] + out["vision_ms"],
                   "splice": out["splice_ms"], "LM prefill (+ generate overhead)": out["lm_prefill_ms"],
                   "decode, 7 more tokens (an 8-token answer)": out["decode_7_tokens_ms"]}
    return out


def section_decode_b8(ctx: Ctx, name: str):
    set_config(ctx.model, name)  # fresh (graphs dropped): warm-up captures again
    ctx.results["configs"].setdefault(name, {"call": CONFIG_CALLS[name]})["decode_b8"] = res = decode(ctx, 8, name)
    ctx.log(f"{name}: decode b8 {res['ms_per_token']:.2f} ms/token")


# ----------------------------------------------------------------------------- runner section

def parse_runner(stderr: str) -> dict:
    out = {}
    if "sparsevlm summary" in stderr:
        summary = stderr[stderr.rindex("sparsevlm summary"):]
        out["summary"] = summary[:2000]
        kept = re.search(r"kept visual tokens per pruning layer \(mean per sample\): (.*)", summary)
        out["kept"] = kept.group(1).strip() if kept else None
        fast = re.search(r"fast path \(cuda_graphs\): (.*)", summary)
        out["fast_path_line"] = fast.group(1).strip() if fast else None
        sparse = re.search(r"sparsevlm summary: (\d+) sparse prefills \(of (\d+) prefills seen\)", summary)
        if sparse:
            out["sparse_prefills"], out["prefills"] = int(sparse.group(1)), int(sparse.group(2))
    bars = re.findall(r"(\d+)/(\d+) \[(\d+):(\d+)<[^,\]]*,\s*([\d.]+)(it/s|s/it)", stderr)
    if bars:
        done, total, mins, secs, rate, unit = bars[-1]
        rate = float(rate)
        per_item = 1 / rate if unit == "it/s" else rate
        # elapsed: the whole loop (capture included), 1 s resolution; the rate is tqdm's smoothed
        # (recent) one: the steady per-prompt time once graphs are captured
        out["tqdm"] = {"done": int(done), "total": int(total), "loop_elapsed_s": int(mins) * 60 + int(secs),
                       "steady_s_per_prompt": per_item}
    return out


def prepare_runner_files(ctx: Ctx) -> dict:
    """The model folder (name contains 'llava': upstream builds the vision tower only then),
    its tokenizer, the question jsonl and the image folder (the eval loop's)."""
    folder = os.path.join(ctx.tmp, "llava-v1.5-7b-random" if not ctx.tiny else "llava-tiny-random")
    t0 = time.perf_counter()
    state = {k: v for k, v in ctx.model.state_dict().items() if ".vision_tower." not in k}
    ctx.model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    ctx.tokenizer.save_pretrained(folder)
    del state
    questions = os.path.join(ctx.tmp, "questions.jsonl")
    with open(questions, "w") as handle:
        for q in ctx.questions:
            handle.write(json.dumps(q) + "\n")
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return {"model_dir": folder, "question_file": questions, "image_folder": ctx.image_folder,
            "saved_bytes": size, "save_s": round(time.perf_counter() - t0, 1)}


RUNNER_RUNS = [  # name, entry (before -m llava.eval.model_vqa_loader), extra flags, seconds it needs
    ("plugin_eager_t0", ["-m", "sparsevlm_patch.run"], ["--temperature", "0"], 100),
    ("plugin_fast_t0", ["-m", "sparsevlm_patch.run", "--cuda-graphs"], ["--temperature", "0"], 90),
    ("plugin_fast_default_temperature", ["-m", "sparsevlm_patch.run", "--cuda-graphs"], [], 90),
    ("dense_upstream_t0", [], ["--temperature", "0"], 100),  # plain upstream, budget permitting
]


def run_loader(ctx: Ctx, files: dict, run_name: str, entry: list, extra: list) -> dict:
    """One subprocess of upstream's model_vqa_loader (through the runner when `entry` says so)."""
    answers = os.path.join(ctx.tmp, f"answers_{run_name}.jsonl")
    cmd = [sys.executable, *entry, "-m", "llava.eval.model_vqa_loader", "--model-path", files["model_dir"],
           "--question-file", files["question_file"], "--image-folder", files["image_folder"],
           "--answers-file", answers, "--conv-mode", CONV_MODE, "--max_new_tokens", str(ctx.answer_tokens), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEVLM")}
    env.update(SPARSEVLM_RETAIN=str(RETAIN), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ctx.log(f"runner/{run_name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(30, min(300, ctx.left() - 10)))
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        text = lambda v: v.decode(errors="replace") if isinstance(v, bytes) else (v or "")  # noqa: E731
        rc, stdout, stderr = "timeout", text(exc.stdout), text(exc.stderr)
    seconds = time.perf_counter() - t0
    lines = sum(1 for _ in open(answers)) if os.path.exists(answers) else 0
    run = {"command": " ".join(cmd[1:]), "returncode": rc, "wall_s": round(seconds, 2), "answer_lines": lines,
           "stderr_tail": stderr[-3000:], "stdout_tail": stdout[-1000:]}
    run.update(parse_runner(stderr))
    if lines:
        with open(answers) as handle:
            run["answers_sample"] = [json.loads(line)["text"] for line in handle.readlines()[:3]]
    ctx.log(f"runner/{run_name}: rc {rc}, {seconds:.1f} s, {lines} answers, kept {run.get('kept')}, "
            f"loop {run.get('tqdm', {}).get('loop_elapsed_s')} s")
    return run


def section_runner(ctx: Ctx):
    res = ctx.results["runner"] = {"retain": RETAIN, "prompts": ctx.n_prompts, "max_new_tokens": ctx.answer_tokens}
    files = prepare_runner_files(ctx)
    res["files"] = files
    ctx.log(f"saved {files['saved_bytes'] / 1e9:.2f} GB to {files['model_dir']} in {files['save_s']} s")
    try:
        if not ctx.cuda:
            cpu_dry_run(ctx, files, res)
        sparsevlm_patch.disable(ctx.model)  # drops the parent's graphs and static buffers
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        res["gpu_memory_free_gib_before_runs"] = [free / 2 ** 30, total / 2 ** 30]
        res["runs"] = {}
        for run_name, entry, extra, need in RUNNER_RUNS:
            if ctx.left() < need:
                ctx.log(f"SKIP runner/{run_name}: {ctx.left():.0f} s left, needs ~{need} s")
                res["runs"][run_name] = {"status": "skipped_budget"}
                ctx.results["skipped"][f"runner/{run_name}"] = "skipped_budget"
                continue
            run = res["runs"][run_name] = run_loader(ctx, files, run_name, entry, extra)
            check(ctx, f"runner/{run_name}/exit_0", run["returncode"] == 0)
            check(ctx, f"runner/{run_name}/answers_{ctx.n_prompts}_lines", run["answer_lines"] == ctx.n_prompts)
            if entry:
                check(ctx, f"runner/{run_name}/kept_66_30_17", run.get("kept") == KEPT_64)
                if "--cuda-graphs" in entry:
                    check(ctx, f"runner/{run_name}/fast_path_captured",
                          (run.get("fast_path_line") or "").startswith("captured"))
            ctx.save()
    finally:
        shutil.rmtree(files["model_dir"], ignore_errors=True)  # ~14 GB on the GPU machine


def cpu_dry_run(ctx: Ctx, files: dict, res: dict):
    """On the CPU: what can be checked of this section. Upstream's loader takes the folder
    (name, tokenizer, vocabulary), and the fast runner command gets as far as upstream's
    first hard-coded CUDA call (the model, tokenizer, questions and images loaded); then
    the section is recorded as skipped_on_cpu."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    name = get_model_name_from_path(files["model_dir"])
    tokenizer, model, processor, _ = load_pretrained_model(files["model_dir"], None, name, device="cpu",
                                                           device_map="cpu")
    ok = (len(tokenizer) == model.config.vocab_size == ctx.model.config.vocab_size and processor is not None
          and model.get_vision_tower().is_loaded)
    res["cpu_load_check"] = {"model_name": name, "tokenizer": type(tokenizer).__name__,
                             "tokenizer_len": len(tokenizer), "vocab": model.config.vocab_size}
    check(ctx, "runner/cpu_folder_loads_with_upstream_loader", ok)
    del model
    run_name, entry, extra, _ = RUNNER_RUNS[1]
    run = res["cpu_dry_run"] = run_loader(ctx, files, run_name, entry, extra)
    reached = (run["returncode"] not in (0, "timeout") and "Torch not compiled with CUDA enabled" in run["stderr_tail"]
               and "llava/eval/model_vqa_loader.py" in run["stderr_tail"] and "sparsevlm summary" in run["stderr_tail"])
    check(ctx, "runner/cpu_dry_run_reaches_upstreams_cuda_call", reached)
    raise SkipSection("skipped_on_cpu", "upstream's model_vqa_loader hard-codes .cuda(): on the CPU the model folder, "
                                        "question file and images were prepared, loaded with upstream's "
                                        "load_pretrained_model, and the --cuda-graphs runner command ran up to "
                                        "upstream's first CUDA call")


# ----------------------------------------------------------------------------- results

def ratios_and_targets(ctx: Ctx):
    configs = ctx.results["configs"]
    dense = configs.get("dense_eager", {})
    get = lambda cfg, key: (cfg.get(key) or {}).get("median_ms")  # noqa: E731
    ratios = {}
    for name in CONFIGS:
        cfg = configs.get(name)
        if not cfg or not dense:
            continue
        r = ratios[name] = {}
        for key in ("ttft_b1", "ttft_b8"):
            if get(cfg, key) and get(dense, key):
                r[f"{key}_speedup"] = get(dense, key) / get(cfg, key)
        for key in ("decode_b1", "decode_b8"):
            if cfg.get(key) and dense.get(key) and cfg[key]["ms_per_token"] > 0:
                r[f"{key}_speedup"] = dense[key]["ms_per_token"] / cfg[key]["ms_per_token"]
        if cfg.get("eval_loop") and dense.get("eval_loop"):
            r["eval_loop_speedup"] = dense["eval_loop"]["total_s"] / cfg["eval_loop"]["total_s"]
        limit = getattr(ctx, "streaming_limit_ms", None)
        if limit and cfg.get("decode_b1"):
            r["decode_b1_over_streaming_limit"] = cfg["decode_b1"]["ms_per_token"] / limit
    fast, dfast = configs.get("plugin_fast", {}), configs.get("dense_fast", {})
    if get(fast, "ttft_b1") and get(dfast, "ttft_b1"):
        ratios.setdefault("plugin_fast", {})["pruning_ttft_b1_speedup"] = get(dfast, "ttft_b1") / get(fast, "ttft_b1")
    ctx.results["ratios"] = ratios
    targets = {}
    for key, (what, op, threshold) in TARGETS.items():
        value = ratios.get("plugin_fast", {}).get(key)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        targets[key] = {"what": what, "target": f"{op} {threshold}", "value": value,
                        "met": None if ctx.tiny else met}
    ctx.results["targets"] = targets
    if ctx.tiny:
        ctx.results["targets_note"] = "tiny CPU run: targets not judged"


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CONFIGS if (results.get("configs", {}).get(n) or {}).get("stages_b1")]
    if not names:
        return "no stage data"
    stages_ = list(results["configs"][names[0]]["stages_b1"]["plot"])
    colors = ["#8da0cb", "#e78ac3", "#fc8d62", "#66c2a5"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    bottoms = [0.0] * len(names)
    for stage, color in zip(stages_, colors):
        values = [max(0.0, results["configs"][n]["stages_b1"]["plot"][stage]) for n in names]
        ax.bar(names, values, bottom=bottoms, label=stage, color=color)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, total in enumerate(bottoms):
        ax.text(i, total, f"{total:.0f} ms", ha="center", va="bottom", fontsize=9)
    meta = results.get("meta", {})
    ax.set_ylabel("ms (synchronised wall time, medians)")
    ax.set_title(f"LLaVA-1.5 {results.get('model', {}).get('shape', '')} ({meta.get('dtype', '')}), batch 1, one "
                 f"image, 8-token answer\n{meta.get('device_name', '')}, {meta.get('date', '')}, "
                 f"{meta.get('code_version') or 'no label'}", fontsize=9)
    ax.set_ylim(0, max(bottoms) * 1.45)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "ok"


def table(ctx: Ctx) -> str:
    r = ctx.results
    lines = ["", f"## bench_fast ({r['meta'].get('device_name')}, {r.get('model', {}).get('shape')}, "
                 f"{r['meta'].get('code_version')})", "",
             "| config | TTFT b1 ms | TTFT b8 ms | decode b1 ms/tok | decode b8 ms/tok | eval loop s | "
             "speedup TTFT b1 / b8 / eval |", "|---|---|---|---|---|---|---|"]
    fm = lambda v, f="{:.1f}": "n/a" if v is None else f.format(v)  # noqa: E731
    for name in CONFIGS:
        c = r["configs"].get(name)
        if not c:
            lines.append(f"| {name} | (not measured) | | | | | |")
            continue
        ra = r.get("ratios", {}).get(name, {})
        lines.append(f"| {name} | {fm((c.get('ttft_b1') or {}).get('median_ms'))} | "
                     f"{fm((c.get('ttft_b8') or {}).get('median_ms'))} | "
                     f"{fm((c.get('decode_b1') or {}).get('ms_per_token'), '{:.2f}')} | "
                     f"{fm((c.get('decode_b8') or {}).get('ms_per_token'), '{:.2f}')} | "
                     f"{fm((c.get('eval_loop') or {}).get('total_s'), '{:.2f}')} | "
                     f"{fm(ra.get('ttft_b1_speedup'), '{:.2f}x')} / {fm(ra.get('ttft_b8_speedup'), '{:.2f}x')} / "
                     f"{fm(ra.get('eval_loop_speedup'), '{:.2f}x')} |")
    bw = r.get("bandwidth")
    if bw:
        lines.append(f"\nHBM {bw['bandwidth_gb_s']:.0f} GB/s (copy), weights {bw['weight_bytes'] / 1e9:.2f} GB: "
                     f"streaming limit {bw['streaming_limit_ms']:.2f} ms/token")
    for name in FAST_CONFIGS:
        fp = (r["configs"].get(name) or {}).get("fast_path")
        if fp:
            lines.append(f"{name} fast path: {fp}")
    if r.get("targets"):
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for key, t in r["targets"].items():
            lines.append(f"| {t['what']} {t['target']} | {fm(t['value'], '{:.2f}')} | {t['met']} |")
    runs = (r.get("runner") or {}).get("runs") or {}
    if runs:
        lines += ["", "| runner (model_vqa_loader) | rc | wall s (load included) | loop s (tqdm) | steady ms/prompt "
                      "| answers | kept |", "|---|---|---|---|---|---|---|"]
        for name, run in runs.items():
            tq = run.get("tqdm") or {}
            steady = tq.get("steady_s_per_prompt")
            lines.append(f"| {name} | {run.get('returncode', run.get('status'))} | {fm(run.get('wall_s'))} | "
                         f"{tq.get('loop_elapsed_s', 'n/a')} | {fm(None if steady is None else steady * 1e3)} | "
                         f"{run.get('answer_lines')} | {run.get('kept')} |")
    lines += bg.checks_footer(ctx, r.get("skipped", {}))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./out)")
    ap.add_argument("--budget-s", type=float, default=490.0,
                    help="skip later sections when less time than they need is left (default 490: with the "
                         "wheel install and imports the device call stays under ~9 minutes)")
    ap.add_argument("--label", default=None, help="code version to record (e.g. the git commit)")
    ap.add_argument("--prompts", type=int, default=None, help="eval-loop prompts (default 64; --tiny 4)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="model dtype on the GPU (float32: the correctness check without bf16 rounding)")
    ap.add_argument("--correctness-only", action="store_true", help="build and the correctness section only")
    ap.add_argument("--profile-b8", action="store_true",
                    help="build, then profile one batch-8 generate(1) eager vs fast path, and stop")
    ap.add_argument("--plot-from", default=None, help="only draw bench_fast.png from this bench_fast.json")
    args = ap.parse_args()
    if args.plot_from:
        with open(args.plot_from) as handle:
            results = json.load(handle)
        out = os.path.join(args.out or os.path.dirname(os.path.abspath(args.plot_from)), "bench_fast.png")
        print(plot(results, out), out)
        return
    ctx = Ctx(args)
    import transformers

    meta = ctx.results["meta"]
    meta.update({
        "command": " ".join(sys.argv), "code_version": args.label, "tiny": ctx.tiny,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(ctx.device), "dtype": str(ctx.dtype),
        "device_name": torch.cuda.get_device_name(0) if ctx.cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "llava": package_version("llava-torch"), "python": platform.python_version(),
        "budget_s": args.budget_s, "cpu_threads": torch.get_num_threads(), "git_head": git_head(),
    })
    ctx.log(f"device {ctx.device} ({meta['device_name']}), dtype {ctx.dtype}, out {ctx.out_dir}")
    try:
        section(ctx, "build", section_build)
        if not hasattr(ctx, "model"):
            raise SystemExit(1)
        if args.profile_b8:
            section(ctx, "profile_b8", section_profile_b8)
            ctx.save()
            return
        section(ctx, "correctness", section_correctness, need_s=60)
        if args.correctness_only:
            ctx.save()
            print(json.dumps({"checks": ctx.results["checks"], "correctness": ctx.results["correctness"]}, default=str)[:6000], flush=True)
            return
        section(ctx, "bandwidth", section_bandwidth, need_s=10)
        for name, need in zip(CONFIGS, (80, 80, 45, 45)):
            section(ctx, f"config_{name}", section_config, name, need_s=need)
        section(ctx, "runner", section_runner, need_s=150)
        for name, need in zip(CONFIGS, (40, 40, 15, 15)):
            section(ctx, f"decode_b8_{name}", section_decode_b8, name, need_s=need)
        ratios_and_targets(ctx)
        try:
            ctx.results["plot"] = plot(ctx.results, os.path.join(ctx.out_dir, "bench_fast.png"))
        except Exception as exc:  # e.g. no matplotlib on the device: --plot-from draws it elsewhere
            ctx.results["plot"] = f"not drawn: {exc!r}"
        meta["total_s"] = round(ctx.elapsed(), 1)
        ctx.save()
        print(table(ctx), flush=True)
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    failed = [k for k, v in ctx.results["checks"].items() if not v]
    if failed or ctx.results["errors"]:
        print(f"bench_fast: {len(failed)} failed checks, {len(ctx.results['errors'])} errors", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
