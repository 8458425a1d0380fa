#!/usr/bin/env python3
"""Multi-GPU distillation with DeepSpeed ZeRO-2 and ZeRO-3: N = 1 and N = 2 GPUs, one call.

Builds LLaVA-1.5-7B shapes with random bf16 weights (upstream's classes, bench_gpu.py's
builders; CLIP ViT-L/14-336 saved beside it) and a generated LLaVA-format dataset, then
for each run launches

    deepspeed --num_gpus N benchmarks/zero_train.py <upstream LoRA flags> --deepspeed zeroS.json \
        --retain_tokens 64

(`zero_train.py` is `sparsevlm_patch/train.py` plus a step timer) with upstream's LoRA recipe
for LLaVA-1.5 (r 128, alpha 256, projector lr 2e-5, lr 2e-4, bf16, gradient checkpointing),
a sparse student at retain 64 and the frozen dense teacher (`--align_loss_weight` 1). Every
run has the same global batch (per-GPU batch x N x accumulation = 2 x per-GPU batch), seed
and data order, so the first steps' losses of all four runs should agree.

Reports per run: samples/s over the steps after warm-up, scaling efficiency of N = 2 against
N = 1 with the same ZeRO stage, peak GPU memory per rank, the teacher's parameter count on
every rank (whole, not partitioned), and the logged loss / lm_loss / align_loss of the first
steps compared across runs.

Device command (repo root; wheels from ../shared/tools/device-wheels.sh plus DeepSpeed's,
see benchmarks/results/zero/README.md; carry .whl):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD \
      && python3 benchmarks/bench_zero.py --label <commit>
CPU smoke test (tiny model, gloo, a few steps): python benchmarks/bench_zero.py --tiny --out DIR
Writes $OUT/zero.json (or --out), the runs' logs beside it, and prints the tables last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import signal
from importlib import metadata
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"z2n1": (2, 1), "z2n2": (2, 2), "z3n1": (3, 1), "z3n2": (3, 2)}
# upstream LLaVA's scripts/zero2.json and scripts/zero3.json
ZERO_COMMON = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
}
ZERO_STAGE = {
    2: {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto"},
    3: {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}
LOSS_KEYS = ("loss", "lm_loss", "align_loss")
PACKAGES = ("torch", "transformers", "deepspeed", "peft", "accelerate", "llava-torch")


def log(*msg):
    print(f"[{time.strftime('%H:%M:%S')}]", *msg, flush=True)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# ----------------------------------------------------------------------------- building

def build_model(work: str, tiny: bool) -> tuple[str, str]:
    """(model folder, CLIP folder): the tiny test model, or 7B shapes with random weights."""
    from sparsevlm_patch.tiny import build_tiny_llava, build_tokenizer

    if tiny:
        model_dir = build_tiny_llava(os.path.join(work, "model"), weight_scale=10.0)
        return model_dir, os.path.join(work, "model", "clip")
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gpu import build_clip, build_llava

    ctx = SimpleNamespace(tiny=False, tmp=work, device="cuda", dtype=torch.bfloat16)
    clip_dir = build_clip(ctx)
    model = build_llava(ctx, "7b", clip_dir)
    model_dir = os.path.join(work, "llava-7b-shapes")
    state = {k: v for k, v in model.state_dict().items() if ".vision_tower." not in k}
    model.save_pretrained(model_dir, state_dict=state, safe_serialization=True)
    build_tokenizer(model_dir)
    del model, state
    torch.cuda.empty_cache()
    return model_dir, clip_dir


def upstream_flags(args, model_dir, clip_dir, data, out, accumulation) -> list[str]:
    flags = [
        "--model_name_or_path", model_dir, "--version", "v1",
        "--data_path", data, "--image_folder", os.path.dirname(data), "--vision_tower", clip_dir,
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
        "--lora_enable", "True", "--lora_r", str(args.lora_r), "--lora_alpha", str(2 * args.lora_r),
        "--lora_dropout", "0",  # dropout masks would differ between 1 and 2 processes
        "--mm_projector_lr", "2e-5", "--learning_rate", "2e-4", "--weight_decay", "0.",
        "--warmup_steps", "6", "--lr_scheduler_type", "cosine",  # upstream's warmup_ratio 0.03 of 200 steps
        "--output_dir", out, "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch), "--gradient_accumulation_steps", str(accumulation),
        "--model_max_length", "2048", "--lazy_preprocess", "True", "--logging_steps", "1",
        "--dataloader_num_workers", str(args.workers), "--report_to", "none", "--save_strategy", "no",
        "--seed", "0", "--retain_tokens", "64",
    ]
    if not args.tiny:
        flags += ["--bf16", "True", "--tf32", "True", "--gradient_checkpointing", "True"]
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- one run

def launch(args, name, model_dir, clip_dir, data, work, gpu_index=None) -> dict:
    """One run under DeepSpeed's launcher; on GPU `gpu_index` alone if given."""
    stage, gpus = RUNS[name]
    out = os.path.join(work, name)
    config = os.path.join(work, f"zero{stage}.json")
    with open(config, "w") as handle:
        json.dump({**ZERO_COMMON, "zero_optimization": ZERO_STAGE[stage]}, handle)
    accumulation = 2 // gpus  # the same global batch for N = 1 and N = 2
    where = ["--num_gpus", str(gpus)] if gpu_index is None else ["--include", f"localhost:{gpu_index}"]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", *where, "--master_port",
               str(free_port()), os.environ.get("BENCH_ZERO_SCRIPT", os.path.join(ROOT, "benchmarks", "zero_train.py")),
               *upstream_flags(args, model_dir, clip_dir, data, out, accumulation), "--deepspeed", config]
    env = dict(os.environ, OMP_NUM_THREADS="4", TOKENIZERS_PARALLELISM="false")
    if args.tiny:  # CPU: DeepSpeed's CPU accelerator, one "device" per process
        env.update(LOCAL_SIZE=str(gpus), CUDA_VISIBLE_DEVICES="")
    log(f"{name}: ZeRO-{stage}, {gpus} GPU(s), accumulation {accumulation}:", " ".join(command))
    started = time.time()
    with open(os.path.join(args.out, f"log_{name}.txt"), "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
            proc.wait()
            code = None
    wall = time.time() - started
    if code not in (0, None):
        raise RuntimeError(f"{name}: exited with {code} (see log_{name}.txt)")
    try:  # a run stopped at the time limit may have finished training (upstream's final save is slow)
        result = read_run(args, out, stage, gpus, accumulation, wall)
    except (OSError, ValueError, KeyError) as error:
        reason = f"timed out after {args.run_timeout} s" if code is None else "wrote no timings"
        raise RuntimeError(f"{name}: {reason} (see log_{name}.txt): {error}") from None
    if code is None:
        result["note"] = f"stopped at the {args.run_timeout} s limit after its last step"
    return result


def read_run(args, out, stage, gpus, accumulation, wall) -> dict:
    ranks = [json.load(open(os.path.join(out, f"timing_rank{r}.json"))) for r in range(gpus)]
    history = ranks[0]["log_history"]
    steps = [{k: e[k] for k in LOSS_KEYS + ("kept_visual_l15",) if k in e} for e in history if "loss" in e]
    ends = ranks[0]["step_end_s"]
    warm = args.warmup
    if len(ends) < warm + 2:
        raise ValueError(f"{len(ends)} steps: too few to time after {warm} warm-up steps")
    global_batch = args.batch * gpus * accumulation
    step_s = [b - a for a, b in zip(ends[warm:], ends[warm + 1:])]
    timed = ends[-1] - ends[warm]
    return {
        "zero_stage": stage, "gpus": gpus, "per_gpu_batch": args.batch, "accumulation": accumulation,
        "global_batch": global_batch, "max_steps": args.steps, "steps": len(ends), "timed_steps": len(step_s), "wall_s": wall,
        "samples_per_s": global_batch * len(step_s) / timed,
        "step_s_median": statistics.median(step_s),
        "peak_allocated_gib": [r["peak_allocated_gib"] for r in ranks],
        "peak_reserved_gib": [r["peak_reserved_gib"] for r in ranks],
        "teacher_parameters": [r["teacher_parameters"] for r in ranks],
        "logged": steps,
    }


# ----------------------------------------------------------------------------- checks, table

def max_rel_diff(run: dict, reference: dict, key: str, steps: int) -> float:
    pairs = list(zip(run["logged"][:steps], reference["logged"][:steps]))
    return max((abs(a[key] - b[key]) / max(abs(b[key]), 1e-8) for a, b in pairs), default=float("nan"))


def checks(args, runs: dict) -> dict:
    """Each run: it ran, its teacher has the same (non-zero) size on every rank, every step ran
    with finite losses; the teacher has one size across runs (a partitioned one would not). Each
    N = 2 run: its first steps' losses equal the 1-GPU run of its ZeRO stage (same seed, data,
    global batch). ZeRO-3 against ZeRO-2 is reported beside them, not checked."""
    found = {}
    done = {n: r for n, r in runs.items() if "logged" in r}
    for name, run in runs.items():
        if "error" in run:
            found[f"{name}: ran ({run['error'][:120]})"] = False
    for name, run in done.items():
        sizes = set(run["teacher_parameters"])
        if sizes != {None}:  # a run with a teacher
            found[f"{name}: teacher of {max(sizes - {None}, default=0):,} parameters on every rank"] = (
                len(sizes) == 1 and None not in sizes and min(sizes) > 0)
        found[f"{name}: {run['steps']} steps, all losses finite"] = (
            run["steps"] == run["max_steps"] and len(run["logged"]) == run["steps"] and all(
                v == v and abs(v) != float("inf") for e in run["logged"] for v in e.values()))
    teachers = {size for r in done.values() for size in r["teacher_parameters"]} - {None}
    if len(done) > 1 and teachers:
        found["one teacher size in every run (none partitioned)"] = len(teachers) == 1
    for name, run in done.items():
        reference = f"z{run['zero_stage']}n1"
        if run["gpus"] == 1 or reference not in done:
            continue
        for key in [k for k in LOSS_KEYS if run["logged"] and k in run["logged"][0]]:
            rel = max_rel_diff(run, done[reference], key, args.compare_steps)
            run.setdefault("max_rel_diff_vs_" + reference, {})[key] = rel
            found[f"{name} vs {reference}: {key}, first {args.compare_steps} steps, rel diff {rel:.2e} "
                  f"<= {args.loss_rtol}"] = rel <= args.loss_rtol
    for n3, n2 in (("z3n1", "z2n1"), ("z3n2", "z2n2")):
        if n3 in done and n2 in done:
            done[n3]["max_rel_diff_vs_" + n2] = {
                k: max_rel_diff(done[n3], done[n2], k, args.compare_steps) for k in LOSS_KEYS
                if done[n3]["logged"] and k in done[n3]["logged"][0]}
    return found


def table(report: dict) -> str:
    runs = report["runs"]
    lines = ["| run | ran (call; beside) | ZeRO | GPUs | global batch | timed steps | samples/s | scaling eff. | "
             "peak alloc GiB per GPU | teacher params per rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        if "samples_per_s" not in run:
            lines.append(f"| {name} | | | | | | {run.get('error') or run.get('not_run')} | | | |")
            continue
        ran = run.get("from", f"{report['label']} {report['date']}") + "".join(f"; beside {n}" for n in run.get("concurrent_with", []))
        single = runs.get(f"z{run['zero_stage']}n1", {}).get("samples_per_s")
        eff = f"{run['samples_per_s'] / (run['gpus'] * single):.2f}" if single and run["gpus"] > 1 else ""
        peak = " / ".join(f"{p:.1f}" for p in run["peak_allocated_gib"] if p is not None) or "-"
        teacher = " / ".join("none" if t is None else f"{t:,}" for t in run["teacher_parameters"])
        lines.append(f"| {name} | {ran} | {run['zero_stage']} | {run['gpus']} | {run['global_batch']} | "
                     f"{run['timed_steps']} | {run['samples_per_s']:.2f} | {eff} | {peak} | {teacher} |")
    done = [n for n, r in runs.items() if "logged" in r]
    if done:
        lines += ["", "First steps (loss / lm_loss / align_loss, averaged over ranks):", "",
                  "| step | " + " | ".join(done) + " |", "|---" * (len(done) + 1) + "|"]
        for i in range(report["args"]["compare_steps"]):
            cells = []
            for n in done:
                e = runs[n]["logged"][i] if i < len(runs[n]["logged"]) else {}
                cells.append(" / ".join(f"{e[k]:.4f}" for k in LOSS_KEYS if k in e))
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        for n3, n2 in (("z3n1", "z2n1"), ("z3n2", "z2n2")):
            if "max_rel_diff_vs_" + n2 in runs.get(n3, {}):
                diff = runs[n3]["max_rel_diff_vs_" + n2]
                lines.append(f"\n{n3} vs {n2} (ZeRO-3 vs ZeRO-2, not checked): max rel diff "
                             + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    lines += ["", "Checks:"] + [f"- [{'ok' if ok else 'FAIL'}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines)


def outcome(fn, *args) -> dict:
    """A run's result, or its error: one failed run must not lose the others."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_zero"))
    parser.add_argument("--label", default="")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of samples/s")
    parser.add_argument("--batch", type=int, default=4, help="per-GPU micro-batch")
    parser.add_argument("--lora_r", type=int, default=128)
    parser.add_argument("--samples", type=int, default=800, help="generated training samples")
    parser.add_argument("--workers", type=int, default=4, help="data-loader workers per rank")
    parser.add_argument("--compare_steps", type=int, default=5)
    parser.add_argument("--loss_rtol", type=float, default=2e-2)
    parser.add_argument("--run_timeout", type=int, default=420)
    parser.add_argument("--budget_s", type=float, default=560, help="start no run past this many seconds")
    parser.add_argument("--parallel_single", action="store_true",
                        help="run the 1-GPU runs at the same time, each on its own GPU")
    parser.add_argument("--previous", help="zero.json of an earlier call: its runs join the report")
    parser.add_argument("--render", metavar="ZERO_JSON", help="only print the tables of a saved report")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, gloo")
    args = parser.parse_args()
    unknown = [n for n in args.runs.split(",") if n not in RUNS]
    if unknown:
        parser.error(f"--runs={args.runs!r}: unknown {unknown}; allowed: {', '.join(RUNS)}")
    if args.steps < args.warmup + 2:
        parser.error(f"--steps={args.steps} with --warmup={args.warmup}: need at least warmup + 2 steps to time")
    if args.render:
        report = json.load(open(args.render))
        report["checks"] = checks(SimpleNamespace(**report["args"]), report["runs"])
        print(table(report))
        return
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    from sparsevlm_patch.tiny import make_dataset

    work = tempfile.mkdtemp(prefix="bench_zero_")
    names = args.runs.split(",")
    available = max(RUNS[n][1] for n in names) if args.tiny else gpu_count()  # tiny: CPU processes
    report = {"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
              "command": " ".join(sys.argv), "gpus_available": available, "runs": {}, "checks": {}}
    if not args.tiny:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    report["versions"] = {p: metadata.version(p) for p in PACKAGES}
    log("building the model and data in", work)
    model_dir, clip_dir = build_model(work, args.tiny)
    data = make_dataset(os.path.join(work, "data"), args.samples, seed=3, multi_turn=True)
    report["build_s"] = time.time() - started
    log(f"built in {report['build_s']:.0f} s")
    if args.previous:
        previous = json.load(open(args.previous))
        for name, run in previous["runs"].items():
            if "samples_per_s" in run:
                report["runs"][name] = {"max_steps": previous["args"]["steps"],
                                        "from": f"{previous['label']} {previous['date']}", **run}
    singles = [n for n in names if RUNS[n][1] == 1] if args.parallel_single and not args.tiny else []
    if not 1 < len(singles) <= available:
        singles = []  # run them one after another with the rest
    if singles:
        with ThreadPoolExecutor(len(singles)) as pool:
            futures = {n: pool.submit(launch, args, n, model_dir, clip_dir, data, work, i)
                       for i, n in enumerate(singles)}
            for name, future in futures.items():
                report["runs"][name] = outcome(future.result)
                report["runs"][name]["concurrent_with"] = [n for n in singles if n != name]
                log(name, json.dumps({k: v for k, v in report["runs"][name].items() if k != "logged"}))
    for name in [n for n in names if n not in singles]:
        gpus = RUNS[name][1]
        if gpus > available:
            report["runs"][name] = {"not_run": f"needs {gpus} GPUs, {available} here"}
        elif time.time() - started > args.budget_s:
            report["runs"][name] = {"not_run": f"time budget ({args.budget_s:.0f} s) spent"}
        else:
            report["runs"][name] = outcome(launch, args, name, model_dir, clip_dir, data, work)
        log(name, json.dumps({k: v for k, v in report["runs"][name].items() if k != "logged"}))
        with open(os.path.join(args.out, "zero.json"), "w") as handle:
            json.dump(report, handle, indent=1)
    report["checks"] = checks(args, report["runs"])
    report["total_s"] = time.time() - started
    with open(os.path.join(args.out, "zero.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    print(table(report))


if __name__ == "__main__":
    main()
