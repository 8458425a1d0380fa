#!/usr/bin/env python3
"""Plot measured LM-prefill speedup vs retained visual tokens from bench_gpu.py's JSON.

    .venv/bin/python benchmarks/plot_results.py benchmarks/results/bench.json \
        benchmarks/results/speedup_vs_retain.png

Lines: measured plugin speedup (recycling on: solid, off: dotted) per batch size, the ideal
pruned stack measured in the same run (same per-layer token counts, zero selection cost;
dashed) and the analytic FLOPs ratio (black).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path, out):
    with open(path) as handle:
        data = json.load(handle)
    pre = data["prefill_7b"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    analytic = {}
    for i, (key, blk) in enumerate(pre.items()):
        color = palette[i % len(palette)]
        for recycle, style in ((True, "-o"), (False, ":x")):
            rows = sorted((r for r in blk["rows"].values() if r["recycle"] == recycle),
                          key=lambda r: r["retain"])
            if not rows:
                continue
            x = [r["retain"] for r in rows]
            ax.plot(x, [r["speedup"] for r in rows], style, color=color,
                    label=f"plugin, batch {blk['batch']}" + ("" if recycle else ", no recycling"))
            if recycle:
                ax.plot(x, [r["ideal_speedup"] for r in rows], "--", color=color, alpha=0.6,
                        label=f"ideal pruned stack, batch {blk['batch']}")
                for r in rows:
                    analytic[r["retain"]] = r["analytic_flops_ratio"]
    b1 = pre.get("b1", {})
    if b1.get("gpu_busy_speedup_r64"):
        ax.plot([64], [b1["gpu_busy_speedup_r64"]], "D", color=palette[0], ms=7,
                label="batch 1, GPU-busy time (what a CUDA graph would approach)")
        ax.plot([64], [b1["gpu_busy_speedup_ideal_r64"]], "d", color=palette[0], ms=7, alpha=0.5,
                label="batch 1, ideal stack GPU-busy time")
    xs = sorted(analytic)
    ax.plot(xs, [analytic[x] for x in xs], "k-", lw=2, label="analytic FLOPs ratio (recycling on)")
    ax.set_xlabel("retained visual tokens (of 576)")
    ax.set_ylabel("LM prefill speedup vs dense upstream (x)")
    meta = data["meta"]
    ax.set_title(f"SparseVLM plugin, LLaVA-1.5-7B shapes, {meta.get('gpu')}, "
                 f"{str(meta.get('dtype')).replace('torch.', '')} {meta.get('attn_implementation')}",
                 fontsize=10)
    ax.set_xticks([64, 96, 128, 192])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/bench.json",
         sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results/speedup_vs_retain.png")
