"""The study's report: JSON, a markdown table with the targets judged, and a plot of accuracy
against visual tokens for each rule."""
from __future__ import annotations

import json
import math
import os

from evaluate import RULES


def _cell(split: dict, key: str = "accuracy") -> str:
    if not split or key not in split:
        return "-"
    return f"{100 * split[key]:.1f} ± {100 * split[key + '_se' if key != 'accuracy' else 'se']:.1f}"


def _rule(r: dict) -> str:
    return r["rule"] + (f" (layers {', '.join(map(str, r['pruning_layers']))})" if r.get("pruning_layers") else "")


def _row(name: str, r: dict) -> str:
    return (f"| {name} | {_rule(r)} | {r['retain'] or 'all'} | {_cell(r.get('object'))} | "
            f"{_cell(r.get('object'), 'kept_in_region')} | {_cell(r.get('location'))} | "
            f"{_cell(r.get('location'), 'kept_in_region')} | {r['flops_vs_dense']:.3f} |")


def paired_difference(a: dict, b: dict) -> dict:
    """Accuracy of row `a` minus row `b` on the same questions, with the standard error of the
    per-question differences (None without per-question hits, as in run 1's JSON)."""
    out = {"difference": round(a["accuracy"] - b["accuracy"], 4), "se": None}
    if a.get("hits") and b.get("hits") and len(a["hits"]) == len(b["hits"]):
        d = [int(x) - int(y) for x, y in zip(a["hits"], b["hits"])]
        mean = sum(d) / len(d)
        out["se"] = round(math.sqrt(sum((v - mean) ** 2 for v in d) / max(1, len(d) - 1) / len(d)), 4)
    return out


def targets(report: dict) -> dict:
    """The issue's targets, judged on what ran (None: its rows did not run). Differences carry
    their paired standard error; "clearly" means by more than two of them."""
    rows = {(e["model"], e["rule"], e["retain"]): e for e in report.get("evaluations", [])
            if not e.get("pruning_layers")}
    low = report.get("budgets", [None])[-1]
    dense = rows.get(("finetuned", "dense", None))
    out = {"dense_object_at_least_90": None if not dense else dense["object"]["accuracy"] >= 0.90}
    text_guided = {}
    for rule in ("sparsevlm", "sparsevlm_v2"):
        mine = rows.get(("finetuned", rule, low))
        for base in ("random", "fastv"):
            other = rows.get(("finetuned", base, low))
            if mine and other:
                text_guided[f"{rule}_minus_{base}"] = {
                    s: paired_difference(mine[s], other[s]) for s in ("object", "location")}
    out["text_guided_vs_baselines_at_lowest_budget"] = text_guided
    for rule in ("sparsevlm", "sparsevlm_v2"):
        student = rows.get((f"distill_{rule}", rule, low))
        control = rows.get(("control", rule, low))
        if student and dense:
            share = student["object"]["accuracy"] / max(1e-9, dense["object"]["accuracy"])
            out[f"distill_{rule}_share_of_dense"] = round(share, 4)
            out[f"distill_{rule}_at_least_95pct"] = share >= 0.95
        if student and control:
            diff = paired_difference(student["object"], control["object"])
            out[f"distill_{rule}_minus_control"] = diff
            out[f"distill_{rule}_above_control"] = diff["difference"] > 0
            out[f"distill_{rule}_clearly_above_control"] = (
                None if diff["se"] is None else diff["difference"] > 2 * diff["se"])
    return out


def markdown(report: dict) -> str:
    lines = ["| model | rule | visual tokens | object acc % | object kept_in_region % | location acc % | "
             "location kept_in_region % | FLOPs vs dense |", "|---|---|---|---|---|---|---|---|"]
    lines += [_row(e["model"], e) for e in report.get("evaluations", [])]
    blind = report.get("blind_accuracy", {})
    lines += ["", "Image-blind answerer (most frequent training answer per question): "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in blind.items()),
              f"Asked objects' share of the image's patches: {report.get('region_share', {})}",
              "", "Targets: `" + json.dumps(targets(report)) + "`"]
    low = report.get("budgets", [None])[-1]
    typed = [e for e in report.get("evaluations", [])
             if e.get("per_type") and (e["rule"] == "dense" or e["model"] != "finetuned" or e["retain"] == low)]
    if typed:
        kinds = sorted({t for e in typed for t in e["per_type"]})
        lines += ["", "Accuracy % per question type (dense rows, the lowest budget, the trained students):", "",
                  "| model | rule | visual tokens | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
        lines += [f"| {e['model']} | {_rule(e)} | {e['retain'] or 'all'} | "
                  + " | ".join(f"{100 * e['per_type'][k]:.1f}" if k in e["per_type"] else "-" for k in kinds) + " |"
                  for e in typed]
    probe = report.get("phases", {}).get("probe", {}).get("attention_lift_per_layer")
    if probe:
        lines += ["", "Attention of the text after the image on the asked objects, over chance, per layer "
                  "(dense fine-tuned model): " + json.dumps(probe)]
    return "\n".join(lines) + "\n"


def plot(path: str, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [e for e in report.get("evaluations", []) if e["model"] == "finetuned" and not e.get("pruning_layers")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("object", "location")):
        for rule in RULES:
            pts = sorted((e["retain"], e[split]["accuracy"]) for e in evals if e["rule"] == rule)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=rule)
        dense = [e for e in evals if e["rule"] == "dense"]
        if dense:
            ax.axhline(dense[0][split]["accuracy"], color="k", ls="--", label="dense")
        blind = report.get("blind_accuracy", {}).get(split)
        if blind is not None:
            ax.axhline(blind, color="gray", ls=":", label="image-blind")
        ax.set_title(f"{split} questions")
        ax.set_xlabel("visual tokens kept (budget)")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: str, report: dict) -> None:
    os.makedirs(out, exist_ok=True)
    report["targets"] = targets(report)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(markdown(report))
    if report.get("evaluations"):
        plot(os.path.join(out, "accuracy_vs_tokens.png"), report)
