#!/usr/bin/env python3
"""Fidelity study on a pretrained LM (issue 15): does text-guided selection keep what the question
names, and does sparse distillation recover what pruning costs?

Phases, in order, in one process (each training stage is its own `python -m sparsevlm_patch.train`):
  data      task.build: images + upstream LLaVA JSON (pretrain / train / test)
  tower     tower.pretrain (skipped with --tower DIR: a tower an earlier call wrote to its $OUT)
  lm        stages.prepare_lm: SmolLM2-135M-Instruct from its GGUF (--preset smoke: a tiny random LM)
  pretrain, finetune                     upstream's two LLaVA stages
  eval      the fine-tuned model: dense, then every rule at every budget
  probe     attention of the text after the image on the asked objects, per layer (dense)
  distill_sparsevlm, control, eval_distill_sparsevlm, eval_control   distillation at the lowest
            budget and its dense control (the same extra steps), then their evaluations
  distill_sparsevlm_v2, eval_distill_sparsevlm_v2
  eval_late_layers   sparsevlm, sparsevlm_v2 and random at the lowest budget, pruning at the
            preset's `late_layers` instead of the defaults
Results are written after every phase (results.json / results.md / accuracy_vs_tokens.png under
--out, the logs next to them), so a call stopped at its limit keeps what it finished. A phase
that would not fit in what is left of --budget-s is recorded in "skipped".

Chaining device calls: with `--work DIR` the scratch folder stays, with a state.json of what is
done, and a later call with the same DIR resumes after the finished phases. Checkpoints (270 MB
each) cannot come back from a device call, so DIR must live on the machine (e.g. /tmp/fidelity2),
and the next call must come while it is still warm (30 s after the last). Across machines only
the tower comes back small: `--tower $OUT/tower` skips its pretraining. `--until tower` stops a
first call after the data and the tower, which need no LM (the GGUF arrives in two calls).

  GPU:  python3 benchmarks/fidelity2/study.py --preset full --out $OUT --budget-s 540 [--work /tmp/fidelity2]
  CPU smoke test (tests/test_fidelity2_smoke.py): study.py --preset smoke --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import evaluate  # noqa: E402
import report as report_mod  # noqa: E402
import stages  # noqa: E402
import task  # noqa: E402
import tower  # noqa: E402


@dataclasses.dataclass
class Preset:
    device: str
    image_size: int
    patch: int
    tower_hidden: int
    tower_layers: int
    tower_heads: int
    tower_steps: int
    tower_batch: int
    n_train: int
    n_test: int  # per split
    turns: int
    batch: int
    workers: int
    pretrain_steps: int
    finetune_steps: int
    distill_steps: int
    eval_batch: int
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-4
    distill_lr: float = 2e-5
    tower_lr: float = 1e-3
    probe_questions: int = 48  # per split, for the attention probe
    # The tower must tell every patch's color, shape and cell on held-out images, or the LM
    # cannot answer what the questions name: the study stops after a tower below this.
    tower_min_accuracy: float = 0.95
    tower_cell_head: bool = True
    # Pruning layers for extra rows at the lowest budget, where the probe of run 3 found the
    # question attending to the asked object (the defaults 2 / 6 / 15 sit where it looked away).
    late_layers: tuple = (17, 21, 23)
    seed: int = 0
    # Rough seconds per phase, to skip what cannot finish in the call's budget.
    seconds: dict = dataclasses.field(default_factory=dict)


PRESETS = {
    "full": Preset(device="cuda", image_size=336, patch=14, tower_hidden=256, tower_layers=6, tower_heads=4,
                   tower_steps=1600, tower_batch=64, n_train=12000, n_test=400, turns=5, batch=32, workers=12,
                   pretrain_steps=200, finetune_steps=1600, distill_steps=200, eval_batch=100,
                   seconds={"tower": 75, "lm": 20, "pretrain": 60, "finetune": 370, "eval": 60, "probe": 15,
                            "eval_late_layers": 15, "distill_sparsevlm": 70, "distill_sparsevlm_v2": 65, "control": 60,
                            "eval_distill_sparsevlm": 12, "eval_distill_sparsevlm_v2": 12, "eval_control": 15}),
    "smoke": Preset(device="cpu", image_size=112, patch=14, tower_hidden=32, tower_layers=2, tower_heads=2,
                    tower_steps=10, tower_batch=4, n_train=12, n_test=4, turns=5, batch=2, workers=0,
                    pretrain_steps=2, finetune_steps=2, distill_steps=1, eval_batch=4, probe_questions=2,
                    tower_min_accuracy=0.0, late_layers=(8, 10, 12)),
}
# The full preset without the tower's grid-cell head (runs 2 and 3, which had it, found the
# question's early attention turned away from the asked object; run 1, without it, did not).
PRESETS["full-nocell"] = dataclasses.replace(PRESETS["full"], tower_cell_head=False)
# The full preset with less training: everything after the tower fits one device call.
PRESETS["lean"] = dataclasses.replace(
    PRESETS["full"], pretrain_steps=150, finetune_steps=1150, distill_steps=120,
    seconds=dict(PRESETS["full"].seconds, lm=10, pretrain=45, finetune=260, eval=50, probe=8, distill_sparsevlm=45,
                 distill_sparsevlm_v2=42, control=36))


def resume(state_path: str, rep: dict, paths: dict) -> None:
    """Take over what an earlier call on this machine finished (its phases without an error, its
    evaluations, its paths), if it left a state file."""
    if not os.path.exists(state_path):
        return
    with open(state_path) as handle:
        saved = json.load(handle)
    paths.update(saved.pop("paths"))
    rep["earlier_calls"] = saved.pop("earlier_calls", []) + [{k: saved.get(k) for k in ("command", "date", "seconds")}]
    rep.update({k: v for k, v in saved.items() if k in ("phases", "evaluations", "blind_accuracy", "region_share")})
    rep["phases"] = {k: v for k, v in rep["phases"].items() if "error" not in v}


def collect_logs(folder: str, path: str) -> None:
    """The end of every training stage's log, in one file (the logs stay on the device machine)."""
    if not os.path.isdir(folder):
        return
    with open(path, "w") as out_log:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as handle:
                out_log.write(f"===== {name}\n" + handle.read()[-20000:] + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--work", default=None,
                    help="scratch folder, kept; a later call with the same folder resumes after its finished "
                         "phases (default: a temporary folder, removed)")
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--tower", default=None, help="a pretrained tower folder from an earlier call")
    ap.add_argument("--label", default=None, help="code version to record")
    ap.add_argument("--until", default=None, choices=("tower",),
                    help="stop after this phase (e.g. a first call that has no GGUF yet; resume with --work)")
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    import torch

    if p.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset full needs a GPU; --preset smoke runs on the CPU")
    started = time.time()
    work = args.work or tempfile.mkdtemp(prefix="fidelity2_")
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "study.log"), "a")

    def log(msg: str) -> None:
        line = f"[{time.time() - started:7.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    rep = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])), "label": args.label,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "preset": dataclasses.asdict(p),
           "device": torch.cuda.get_device_name() if p.device == "cuda" else "cpu",
           "torch": torch.__version__, "phases": {}, "skipped": [], "evaluations": []}
    visual = (p.image_size // p.patch) ** 2
    rep["visual_tokens"] = visual
    rep["budgets"] = [evaluate.scaled_budget(b, visual) for b in evaluate.PAPER_BUDGETS]
    dtype = torch.bfloat16 if p.device == "cuda" else torch.float32
    paths: dict = {}
    evaluator = None
    state_path = os.path.join(work, "state.json")
    resume(state_path, rep, paths)

    def save_state():
        rep["seconds"] = round(time.time() - started, 1)
        report_mod.write(args.out, rep)
        with open(state_path, "w") as handle:
            json.dump(dict(rep, paths={k: v for k, v in paths.items() if k != "train_scenes"}), handle)

    stopped: list = []

    def phase(name, fn):
        if name in rep["phases"]:
            log(f"{name}: done in an earlier call")
            return rep["phases"][name]
        if stopped:
            rep["skipped"].append(name)
            return None
        need = p.seconds.get(name, 0)
        if time.time() - started + need > args.budget_s:
            log(f"skip {name}: needs ~{need}s, {args.budget_s - (time.time() - started):.0f}s left")
            rep["skipped"].append(name)
            return None
        t0 = time.time()
        try:
            result = fn()
        except Exception as exc:  # recorded; later phases that need it are skipped by their own checks
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            rep["phases"][name] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
            save_state()
            return None
        rep["phases"][name] = dict(result or {}, seconds=round(time.time() - t0, 1))
        if name == args.until:
            log(f"stop after {name} (--until)")
            stopped.append(name)
        save_state()
        return result or {}

    def data():
        built = task.build(os.path.join(work, "data"), size=p.image_size, n_train=p.n_train, n_test=p.n_test,
                           turns=p.turns, seed=p.seed, workers=max(1, p.workers))
        paths.update(built)
        with open(built["test"]) as handle:
            test = json.load(handle)
        rep["blind_accuracy"] = task.blind_accuracy(built["train"], test)
        shares = {}
        for record in test:
            shares.setdefault(record["info"]["split"], []).append(
                len(task.region_patches(record["scene"], record["info"], p.patch)) / visual)
        rep["region_share"] = {s: round(sum(v) / len(v), 4) for s, v in shares.items()}
        nonlocal evaluator
        evaluator = evaluate.Evaluator(test, built["image_folder"], p.patch, p.eval_batch, p.device)
        return {"train_images": p.n_train, "test_questions": len(test)}

    def tower_phase():
        if args.tower:
            paths["tower"] = args.tower
            return {"reused": args.tower}
        paths["tower"] = os.path.join(work, "tower")
        result = tower.pretrain(paths["tower"], paths["train_scenes"], image_size=p.image_size, patch=p.patch,
                                hidden=p.tower_hidden, layers=p.tower_layers, heads=p.tower_heads,
                                steps=p.tower_steps, batch=p.tower_batch, lr=p.tower_lr, seed=p.seed,
                                device=p.device, workers=max(1, p.workers), cell_head=p.tower_cell_head,
                                log=log)
        # Small: comes back from a device call.
        shutil.copytree(paths["tower"], os.path.join(args.out, "tower"), dirs_exist_ok=True)
        weak = {k: v for k, v in result["held_out_patch_accuracy"].items() if v < p.tower_min_accuracy}
        if weak:
            raise RuntimeError(f"the tower's held-out per-patch accuracy {weak} is under {p.tower_min_accuracy}: "
                               "the LM could not answer what the questions name; train the tower longer")
        return result

    def lm():
        paths["lm"] = os.path.join(work, "lm")
        return stages.prepare_lm(paths["lm"], tiny=args.preset == "smoke", dtype=dtype)

    def evaluate_models(plan):
        for model_name, rows in plan:
            if model_name not in paths:
                continue
            loaded = evaluate.load(paths[model_name], p.device, dtype)
            for rule, retain, *rest in rows:
                layers = rest[0] if rest else None
                result = evaluator.evaluate(loaded, rule, retain, layers)
                result["model"] = model_name
                key = evaluate.row_key(result)  # a rerun replaces the row
                rep["evaluations"] = [e for e in rep["evaluations"] if evaluate.row_key(e) != key] + [result]
                log(f"eval {model_name} {rule} {retain}" + (f" layers {layers}" if layers else "") + ": "
                    + ", ".join(f"{s} {result[s]['accuracy']:.3f}" for s in task.QUESTION_TYPES if s in result))
                report_mod.write(args.out, rep)
            del loaded
        return {}

    low = rep["budgets"][-1]
    if "data" in rep["phases"] and "tower" not in rep["phases"]:
        rep["phases"].pop("data")  # the tower needs the scenes, which are not kept across calls
    for name, fn in (("data", data), ("tower", tower_phase), ("lm", lm),
                     ("pretrain", lambda: stages.pretrain(p, paths, work, log)),
                     ("finetune", lambda: stages.finetune(p, paths, work, log))):
        needs_lm = name in ("pretrain", "finetune") and "lm" not in paths
        weak_tower = name not in ("data", "tower") and "error" in rep["phases"].get("tower", {})
        if name != "data" and (evaluator is None or needs_lm or weak_tower):
            rep["skipped"].append(name)
            continue
        phase(name, fn)
        if name == "data" and evaluator is None and "test" in paths:
            with open(paths["test"]) as handle:
                evaluator = evaluate.Evaluator(json.load(handle), paths["image_folder"], p.patch, p.eval_batch,
                                               p.device)
    if "finetuned" in paths:
        phase("eval", lambda: evaluate_models([("finetuned", [(None, None)] + [
            (rule, budget) for budget in rep["budgets"] for rule in evaluate.RULES])]))

        def probe():
            loaded = evaluate.load(paths["finetuned"], p.device, dtype)
            records = evaluator.records[:p.probe_questions] + evaluator.records[-p.probe_questions:]
            lift = evaluate.attention_probe(loaded, records, paths["image_folder"], p.patch, p.device)
            log(f"attention lift on the asked objects per layer: {lift}")
            return {"attention_lift_per_layer": lift, "questions_per_split": p.probe_questions}

        phase("probe", probe)
        # One evaluation phase per trained model, so that a resumed call evaluates a model that an
        # earlier call trained after its evaluation slot was skipped. sparsevlm's student and the
        # control come first: a call that runs short keeps the comparison the targets name first.
        plans = {f"distill_{rule}": [(rule, low), (None, None)] for rule in ("sparsevlm", "sparsevlm_v2")}
        plans["control"] = [(None, None), ("sparsevlm", low), ("sparsevlm_v2", low)]
        for group in (("distill_sparsevlm", "control"), ("distill_sparsevlm_v2",)):
            for model_name in group:
                rule = model_name.replace("distill_", "")
                phase(model_name, lambda m=model_name, r=rule: stages.continue_training(
                    p, paths, work, log, m, None if m == "control" else {"selection": r, "retain": low}))
            for model_name in group:
                if model_name in paths:
                    phase(f"eval_{model_name}", lambda m=model_name: evaluate_models([(m, plans[m])]))
                else:
                    rep["skipped"].append(f"eval_{model_name}")
        phase("eval_late_layers", lambda: evaluate_models([("finetuned", [
            (rule, low, p.late_layers) for rule in ("sparsevlm", "sparsevlm_v2", "random")])]))
    else:
        rep["skipped"].append("everything after fine-tuning (no fine-tuned model)")
    collect_logs(os.path.join(work, "logs"), os.path.join(args.out, "training_logs.txt"))
    save_state()
    print(report_mod.markdown(rep))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, v in rep["phases"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
