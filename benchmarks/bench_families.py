#!/usr/bin/env python3
"""GPU run of the supported model families (issue 14): Llama, Mistral and Qwen2 LLaVAs at 7B shapes.

For each family, in one process and one after the other (each model is freed before the next
is built: a 7B model in bf16 is ~15 GB):

- llama:   LLaVA-1.5-7B, llava-torch's `LlavaLlamaForCausalLM` (Llama-2-7B shapes: hidden 4096,
           32 layers, 32 heads, MLP 11008, vocab 32000); the reference.
- mistral: LLaVA-1.6-Mistral-7B LM shapes, llava-torch's `LlavaMistralForCausalLM` (hidden 4096,
           32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 32000, rope_theta 1e6 as
           Mistral-7B-Instruct-v0.2, sliding_window None).
- qwen2:   LLaVA-NeXT Qwen2-7B LM shapes, llavaction's `LlavaQwenForCausalLM` (hidden 3584,
           28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064, rope_theta 1e6,
           sliding_window None, use_sliding_window False).

Every model is built from its codebase's own classes with random bf16 weights on the GPU,
`attn_implementation="sdpa"`, and gets the same random CLIP ViT-L/14-336 tower (saved to a temp
folder once, loaded by each model's own `initialize_vision_modules`) and an mlp2x_gelu
projector: one image = 576 visual tokens. Prompts: 32 samples of 671 tokens (35 + 576 + 60,
vicuna_v1-shaped, random ids; samples differ in question ids and image), spliced once with the
model's own `prepare_inputs_labels_for_multimodal` while the plugin is enabled (LlavaQwen: with
`modalities=["image"] * B`, and its 7 return values). Outside a model call the plugin attaches
the batch layout to the returned embeddings tensor, so every
`model.get_model()(inputs_embeds=embeds, attention_mask=..., position_ids=..., use_cache=False)`
on that tensor prunes; the LM prefill is timed repeatedly on it.

Per family:
- checks: the dense and the retain-64 LM outputs are finite; `last_stats(model)["kept_visual"]`
  equals the preset [66, 30, 17] for every sample at retain 64 (and the last layer really ran
  on fewer tokens); retain 576 (nothing pruned) equals dense; the attention is SDPA; batch-1
  `generate` of 8 new tokens at retain 64 gives finite scores and the preset counts.
- timing: LM prefill at batch 32, dense (`sparsevlm_patch.disable(model)`) vs retain 64
  (`sparsevlm_patch.enable(model, retain_tokens=64)`): medians of interleaved rounds after
  warm-up, CUDA events; speedup = dense / sparse, and that speedup over Llama's; the analytic
  FLOPs ratio from `last_stats`; the batch-1 generate time (informational).
Only the public API (`enable` / `disable` / `last_stats` / `last_keep_mask`) and upstream's own
calls are used; the run context, CLIP build, prompts and timing helpers are bench_gpu.py's.
A family that would not fit in the time left (`--budget-s`) is recorded as "skipped_budget";
an error in one family is recorded and the next one still runs.

Writes `bench_families.json` under --out (default $OUT, else ./out): device, torch /
transformers / llava versions, date, --label, per-family results, checks, errors, skipped.
Prints a short table last. Exit status 1 if any family errored.

Device command (from the repo root). Wheels as for bench_gpu.py, plus llavaction (pure
Python, LLaVA-NeXT's code; it also needs einops, which the GPU image has):
    bash ../shared/tools/device-wheels.sh llavaction==0.0.1      # here, once: fills .whl/
    # (.whl/ already made for bench_gpu.py: python3 -m pip download --no-deps -d .whl llavaction==0.0.1)
then one `run` with carry [".whl"] (an H100 or H200; ~16 GB of GPU memory per model, ~31 GB
at the peak of the Qwen build: its __init__ builds a plain Qwen2 LM first and replaces it):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \\
      && python3 benchmarks/bench_families.py --budget-s 420 --label <commit>
CPU smoke test (tiny shapes: hidden 64, 16 layers, tiny CLIP, batch 2, one round, one CPU
thread; a few seconds; tests/test_bench_families_smoke.py runs it):
    .venv/bin/python benchmarks/bench_families.py --tiny --out /tmp/bench_families_tiny
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import sparsevlm_patch  # noqa: E402  (installs the hooks before llava / llavaction are imported)
from bench_gpu import Ctx as _GpuCtx  # noqa: E402
from bench_gpu import bench_rounds, build_clip, checks_footer, make_inputs, random_llava, timed  # noqa: E402

RETAIN = 64
PRESET_R64 = [66, 30, 17]  # the default rule's preset for 64 on 576 visual tokens (README)
NEW_TOKENS = 8
FAMILY_ORDER = ("llama", "mistral", "qwen2")

FAMILIES = {
    "llama": dict(title="LLaVA-1.5-7B", llava_class="LlavaLlamaForCausalLM", lm="LlamaModel",
                  codebase="llava-torch"),
    "mistral": dict(title="LLaVA-1.6-Mistral-7B", llava_class="LlavaMistralForCausalLM", lm="MistralModel",
                    codebase="llava-torch"),
    "qwen2": dict(title="LLaVA-NeXT Qwen2-7B", llava_class="LlavaQwenForCausalLM", lm="Qwen2Model",
                  codebase="llavaction"),
}
SHAPES = {
    "llama": dict(hidden=4096, layers=32, heads=32, kv_heads=32, mlp=11008, vocab=32000,
                  rope_theta=10000.0, rms_eps=1e-5, max_pos=4096),
    "mistral": dict(hidden=4096, layers=32, heads=32, kv_heads=8, mlp=14336, vocab=32000,
                    rope_theta=1e6, rms_eps=1e-5, max_pos=32768),
    "qwen2": dict(hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18944, vocab=152064,
                  rope_theta=1e6, rms_eps=1e-6, max_pos=32768),
}
# Tiny shapes (CPU smoke test), as the tests build them; grouped-query attention kept where
# the real model has it (2 KV heads of 4), so the smoke test runs that path too.
TINY_SHAPES = {
    "llama": dict(hidden=64, layers=16, heads=4, kv_heads=4, mlp=128, vocab=1000,
                  rope_theta=10000.0, rms_eps=1e-5, max_pos=4096),
    "mistral": dict(hidden=64, layers=16, heads=4, kv_heads=2, mlp=160, vocab=1000,
                    rope_theta=1e6, rms_eps=1e-5, max_pos=4096),
    "qwen2": dict(hidden=64, layers=16, heads=4, kv_heads=2, mlp=192, vocab=1500,
                  rope_theta=1e6, rms_eps=1e-6, max_pos=4096),
}
# Seconds a family needs (build, splice, checks, timing, generate, free), before the first one
# has run; afterwards 1.3x the longest family so far.
NEED_S = {"gpu": 75.0, "tiny": 5.0}


class Ctx(_GpuCtx):
    """bench_gpu's run context (device, dtype, budget, log), writing bench_families.json."""

    def save(self):
        with open(os.path.join(self.out_dir, "bench_families.json"), "w") as handle:
            json.dump(self.results, handle, indent=1, default=str)


def version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gib(n_bytes) -> float:
    return round(n_bytes / 2**30, 3)


# ----------------------------------------------------------------------------- building

def family_classes(family: str):
    if family == "llama":
        from llava.model import LlavaConfig, LlavaLlamaForCausalLM
        return LlavaConfig, LlavaLlamaForCausalLM, {}
    if family == "mistral":
        from llava.model import LlavaMistralConfig, LlavaMistralForCausalLM
        return LlavaMistralConfig, LlavaMistralForCausalLM, {"sliding_window": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # llavaction's import: pyav / OpenCLIP not installed
        from llavaction.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM
    return LlavaQwenConfig, LlavaQwenForCausalLM, {"sliding_window": None, "use_sliding_window": False}


def build_family(ctx: Ctx, family: str, clip_dir: str):
    """The family's LLaVA class with random weights of the given shapes, on the device, with
    the CLIP tower at `clip_dir` and an mlp2x_gelu projector, as upstream's training builds it."""
    config_cls, model_cls, extra = family_classes(family)
    s = (TINY_SHAPES if ctx.tiny else SHAPES)[family]
    config = config_cls(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                        num_key_value_heads=s["kv_heads"], max_position_embeddings=s["max_pos"],
                        rms_norm_eps=s["rms_eps"], rope_theta=s["rope_theta"], bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, use_cache=True,
                        attn_implementation="sdpa", **extra)
    return random_llava(ctx, model_cls, config, clip_dir)


# ----------------------------------------------------------------------------- one family

def splice(model, family: str, input_ids, images, image_sizes):
    """The model's own splice (hooked by the plugin), as its generate calls it:
    (position_ids, attention_mask, inputs_embeds)."""
    kwargs = {"modalities": ["image"] * input_ids.shape[0]} if family == "qwen2" else {}
    with torch.no_grad():
        out = model.prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, images,
                                                         image_sizes=image_sizes, **kwargs)
    return out[1], out[2], out[4]  # llava-torch returns 6 values, LLaVA-NeXT 7 (action_idx last)


def lm_forward(model, embeds, attention_mask, position_ids):
    with torch.no_grad():
        return model.get_model()(inputs_embeds=embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False).last_hidden_state


def attention_class(model) -> str:
    return type(model.get_model().layers[0].self_attn).__name__


def run_family(ctx: Ctx, family: str, clip_dir: str, res: dict):
    """Build, check, time, generate; fills `res` as it goes (so a failure keeps what ran)."""
    checks = res["checks"]
    batch = 2 if ctx.tiny else 32
    warmup, rounds = (0, 1) if ctx.tiny else (3, 10)  # tiny: the check forwards above warm up
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
        res["mem_before_build_gib"] = gib(torch.cuda.memory_allocated())

    t0 = time.perf_counter()
    model = build_family(ctx, family, clip_dir)
    ctx.sync()
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["parameters"] = sum(p.numel() for p in model.parameters())
    res["attention"] = attention_class(model)
    res["attn_implementation"] = model.config._attn_implementation
    checks["sdpa"] = "Sdpa" in res["attention"]
    ctx.log(f"{family}: built {type(model).__name__} ({res['parameters'] / 1e9:.2f} B parameters, "
            f"{res['attention']}) in {res['build_s']} s")

    # ---- batch-32 prompts, spliced once with the plugin enabled
    input_ids, images, image_sizes = make_inputs(ctx, batch, model.config.vocab_size)
    sparsevlm_patch.enable(model, retain_tokens=RETAIN)
    position_ids, attention_mask, embeds = splice(model, family, input_ids, images, image_sizes)
    length = embeds.shape[1]
    res["batch"], res["prompt_tokens"] = batch, length
    res["visual_tokens"] = length - (input_ids.shape[1] - 1)

    # ---- checks
    sparsevlm_patch.disable(model)
    dense = lm_forward(model, embeds, attention_mask, position_ids)
    checks["dense_finite"] = bool(torch.isfinite(dense.float()).all())
    sparsevlm_patch.enable(model, retain_tokens=RETAIN)
    sparse = lm_forward(model, embeds, attention_mask, position_ids)
    stats = sparsevlm_patch.last_stats(model)
    keep = sparsevlm_patch.last_keep_mask(model)
    checks["sparse_finite"] = bool(torch.isfinite(sparse.float()).all())
    checks["kept_visual_preset_r64"] = stats is not None and stats["kept_visual"] == [PRESET_R64] * batch
    checks["pruned"] = bool(stats and stats["tokens_per_layer"][0][-1] < length)
    if stats:
        res["kept_visual"] = stats["kept_visual"][0]
        res["tokens_per_layer"] = stats["tokens_per_layer"][0]
        res["flops_ratio"] = stats["flops"]["ratio"]
        res["selection"] = stats.get("selection")
    res["keep_mask_tokens"] = int(keep[0].sum()) if keep is not None else None
    sparsevlm_patch.enable(model, retain_tokens=576)
    full = lm_forward(model, embeds, attention_mask, position_ids)
    res["retain576_rel_diff_vs_dense"] = float((full.float() - dense.float()).norm() / dense.float().norm())
    res["retain576_bit_equal_dense"] = bool(torch.equal(full, dense))
    checks["retain576_equals_dense"] = res["retain576_rel_diff_vs_dense"] < 1e-3
    del dense, sparse, full
    if not all(checks.values()):
        ctx.log(f"{family}: CHECK FAILED {[k for k, v in checks.items() if not v]}; stats {stats}")

    # ---- LM prefill at batch 32, dense vs retain 64, interleaved rounds
    def run():
        return lm_forward(model, embeds, attention_mask, position_ids)

    configs = {"dense": (lambda: sparsevlm_patch.disable(model), run),
               f"r{RETAIN}": (lambda: sparsevlm_patch.enable(model, retain_tokens=RETAIN), run)}
    timing = bench_rounds(ctx, configs, rounds=rounds, warmup=warmup)
    sparsevlm_patch.enable(model, retain_tokens=RETAIN)  # the same tensor still prunes after the rounds
    run()
    after = sparsevlm_patch.last_stats(model)
    checks["timed_sparse_pruned"] = bool(after and after["kept_visual"] == [PRESET_R64] * batch)
    dense_ms, sparse_ms = timing["dense"]["median_ms"], timing[f"r{RETAIN}"]["median_ms"]
    res["prefill"] = {"batch": batch, "warmup": warmup, "rounds": rounds, "dense_ms": dense_ms,
                      "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "timing": timing}
    ctx.log(f"{family}: prefill b{batch} dense {dense_ms:.2f} ms, r{RETAIN} {sparse_ms:.2f} ms, "
            f"{dense_ms / sparse_ms:.2f}x")
    del embeds, attention_mask, position_ids, input_ids, images

    # ---- batch-1 generate at retain 64
    ids1, images1, sizes1 = make_inputs(ctx, 1, model.config.vocab_size)
    kwargs = {"modalities": ["image"]} if family == "qwen2" else {}
    sparsevlm_patch.enable(model, retain_tokens=RETAIN)

    def gen():
        with torch.inference_mode():
            return model.generate(ids1, images=images1, image_sizes=sizes1, max_new_tokens=NEW_TOKENS,
                                  do_sample=False, return_dict_in_generate=True, output_scores=True,
                                  **kwargs)

    if not ctx.tiny:
        gen()  # warm-up (kernel selection at these shapes)
    gen_ms, _, out = timed(ctx, gen)
    gstats = sparsevlm_patch.last_stats(model)
    scores = torch.stack([s.float() for s in out.scores])
    res["generate_b1"] = {"new_tokens": len(out.scores), "ms": gen_ms,
                          "kept_visual": gstats["kept_visual"] if gstats else None,
                          "sequence": out.sequences[0].tolist()}
    checks["generate_finite"] = bool(torch.isfinite(scores).all()) and len(out.scores) >= 1
    checks["generate_kept_visual_preset_r64"] = bool(gstats and gstats["kept_visual"] == [PRESET_R64])
    del out, scores

    if ctx.cuda:
        res["peak_mem_gib"] = gib(torch.cuda.max_memory_allocated())
    sparsevlm_patch.disable(model)
    del model
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        res["mem_after_free_gib"] = gib(torch.cuda.memory_allocated())
        if res["mem_after_free_gib"] > 1.0:
            ctx.log(f"{family}: {res['mem_after_free_gib']} GiB still allocated after freeing the model")


def family_entry(family: str, shapes: dict) -> dict:
    info = FAMILIES[family]
    return {"title": info["title"], "llava_class": info["llava_class"], "lm": info["lm"],
            "codebase": info["codebase"], "shapes": shapes, "status": None, "checks": {}}


def bench_family(ctx: Ctx, family: str, clip_dir: str, need_s: float) -> float:
    res = family_entry(family, (TINY_SHAPES if ctx.tiny else SHAPES)[family])
    ctx.results["families"][family] = res
    if ctx.left() < need_s:
        ctx.log(f"SKIP {family}: {ctx.left():.0f} s left, needs ~{need_s:.0f} s")
        res["status"] = "skipped_budget"
        ctx.results["skipped"].append(family)
        ctx.save()
        return 0.0
    ctx.log(f"== {family}: {res['title']} ({res['llava_class']})")
    t0 = time.perf_counter()
    try:
        run_family(ctx, family, clip_dir, res)
        res["status"] = "ok"
    except Exception as exc:  # keep going: the other families still report
        ctx.log(f"ERROR in {family}: {exc!r}")
        traceback.print_exc()
        res["status"] = "error"
        ctx.results["errors"].append({"family": family, "error": repr(exc),
                                      "traceback": traceback.format_exc()[-3000:]})
    finally:
        res["total_s"] = round(time.perf_counter() - t0, 1)
        for name, ok in res["checks"].items():
            ctx.results["checks"][f"{family}/{name}"] = ok
        ctx.save()
    if res["status"] == "error":  # the traceback (and the model in its frames) is gone now: free
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
            res["mem_after_free_gib"] = gib(torch.cuda.memory_allocated())
            ctx.save()
    return res["total_s"]


# ----------------------------------------------------------------------------- report

def add_relative(ctx: Ctx):
    fams = ctx.results["families"]
    ref = fams.get("llama", {}).get("prefill", {}).get("speedup")
    for res in fams.values():
        pre = res.get("prefill")
        if pre and ref:
            pre["speedup_over_llama"] = pre["speedup"] / ref


def table(ctx: Ctx) -> str:
    r = ctx.results
    lines = ["", f"### Model families, LM prefill at batch {2 if ctx.tiny else 32}, dense vs retain {RETAIN} "
             f"({r['meta']['device_name']}, {'fp32' if ctx.tiny else 'bf16'}, medians)",
             "| family | class | status | dense ms | r64 ms | speedup | x Llama's | FLOPs ratio | kept visual | "
             "generate b1 | checks |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, res in r["families"].items():
        pre = res.get("prefill") or {}
        gen = res.get("generate_b1") or {}
        fmt = lambda v, f, unit="": "n/a" if v is None else format(v, f) + unit  # noqa: E731
        ok = sum(bool(v) for v in res["checks"].values())
        generated = f"{gen['ms']:.1f} ms, {gen['new_tokens']} tokens" if gen else "n/a"
        lines.append(
            f"| {family} | {res['llava_class']} | {res['status']} | {fmt(pre.get('dense_ms'), '.2f')} | "
            f"{fmt(pre.get('sparse_ms'), '.2f')} | {fmt(pre.get('speedup'), '.2f', 'x')} | "
            f"{fmt(pre.get('speedup_over_llama'), '.3f')} | {fmt(res.get('flops_ratio'), '.2f', 'x')} | "
            f"{res.get('kept_visual', 'n/a')} | {generated} | {ok}/{len(res['checks'])} |")
    lines += checks_footer(ctx, r["skipped"])
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, fp32 (smoke test)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./out)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip a family ('skipped_budget') when less time than it needs is left")
    ap.add_argument("--families", nargs="*", default=list(FAMILY_ORDER), choices=FAMILY_ORDER,
                    help="families to run, in this order (default: all)")
    ap.add_argument("--label", default=None, help="code version to record (e.g. the git commit)")
    args = ap.parse_args()
    ctx = Ctx(args)
    if ctx.tiny:
        # One thread: tiny shapes gain nothing from more, and on a shared CPU (CI, busy cores)
        # oversubscribed threads made the smoke run 10-20x slower.
        torch.set_num_threads(1)
    ctx.results.update({"families": {}, "skipped": []})
    meta = ctx.results["meta"]
    meta.update({
        "command": " ".join(sys.argv), "label": args.label, "code_version": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": ctx.tiny, "budget_s": args.budget_s,
        "device": str(ctx.device), "dtype": str(ctx.dtype),
        "device_name": torch.cuda.get_device_name() if ctx.cuda else platform.processor() or "cpu",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": version("transformers"), "llava-torch": version("llava-torch"),
        "llavaction": version("llavaction"), "sparsevlm_patch": sparsevlm_patch.__version__,
        "retain": RETAIN, "prompt": "35 + 576 visual + 60 tokens", "attn_implementation": "sdpa",
    })
    if ctx.cuda:
        meta["gpu_memory_gib"] = gib(torch.cuda.get_device_properties(0).total_memory)
    ctx.log(f"device {ctx.device} ({meta['device_name']}), dtype {ctx.dtype}, out {ctx.out_dir}")
    ctx.save()

    t0 = time.perf_counter()
    try:
        clip_dir = build_clip(ctx)  # one random CLIP ViT-L/14-336 (tiny: a narrow one), shared
    except Exception as exc:
        ctx.results["errors"].append({"family": "clip", "error": repr(exc),
                                      "traceback": traceback.format_exc()[-3000:]})
        ctx.save()
        print(table(ctx), flush=True)
        sys.exit(1)
    meta["clip_build_s"] = round(time.perf_counter() - t0, 1)
    need = NEED_S["tiny" if ctx.tiny else "gpu"]
    for family in args.families:
        took = bench_family(ctx, family, clip_dir, need)
        need = max(need, 1.3 * took)
    add_relative(ctx)
    shutil.rmtree(ctx.tmp, ignore_errors=True)  # the saved CLIP (1.2 GB at ViT-L shapes)
    meta["total_s"] = round(ctx.elapsed(), 1)
    ctx.save()
    print(table(ctx), flush=True)
    sys.exit(1 if ctx.results["errors"] else 0)


if __name__ == "__main__":
    main()
