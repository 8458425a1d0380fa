"""The GPU benchmark script (benchmarks/bench_gpu.py) on tiny shapes on the CPU: every
section runs without error and every check it makes passes, so the one-call device run
does not fail on code that changed since it was last run."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_script_runs_on_tiny_shapes(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--tiny",
                           "--budget-s", "3000", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=3000)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["errors"] == [], results["errors"]
    assert results.get("skipped", []) == []
    assert results["checks"] and all(results["checks"].values()), results["checks"]
    for section in ("prefill_7b", "overheads", "generation_7b", "distill"):
        assert section in results, section
    selection = results["overheads"]["selection"]["b1/r64_rec"]
    assert selection["host_ms"] > 0 and selection["total"] > 0 and selection["ideal_ms"] > 0, selection
    # the other selection rules are timed next to sparsevlm's at the largest batch
    largest = results["prefill_7b"][max(results["prefill_7b"], key=lambda k: int(k[1:]))]
    ratios = largest["rules_vs_sparsevlm"]
    assert set(ratios) == {"r64_sparsevlm_v2", "r64_fastv"}, ratios
    assert all(v["over_sparsevlm"] > 0 for v in ratios.values()), ratios


def test_multi_gpu_benchmark_script_runs_on_cpu(tmp_path):
    """benchmarks/bench_zero.py through DeepSpeed's own launcher on tiny shapes (CPU, gloo):
    ZeRO-2 on 1 and 2 processes and ZeRO-3 on 1. Two processes see the same data as one
    with gradient accumulation, so their first losses are equal. (ZeRO-3 on 2 CPU processes
    is covered by test_distributed.py: its losses are not reproducible on CPU.)"""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_zero.py"), "--tiny",
                           "--out", str(tmp_path), "--runs", "z2n1,z2n2,z3n1", "--steps", "3", "--warmup", "1",
                           "--batch", "2", "--lora_r", "8", "--samples", "16", "--workers", "0",
                           "--compare_steps", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=3000)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "zero.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"z2n1", "z2n2", "z3n1"} and all("samples_per_s" in r for r in runs.values()), runs
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    assert any("z2n2 vs z2n1" in name for name in report["checks"])
    assert runs["z2n2"]["logged"][:2] == runs["z2n1"]["logged"][:2]
    assert len({size for r in runs.values() for size in r["teacher_parameters"]}) == 1
