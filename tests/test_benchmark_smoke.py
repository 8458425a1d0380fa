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
                           "--budget-s", "900", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["errors"] == [], results["errors"]
    assert results.get("skipped", []) == []
    assert results["checks"] and all(results["checks"].values()), results["checks"]
    for section in ("prefill_7b", "overheads", "generation_7b", "distill"):
        assert section in results, section
    assert results["overheads"]["selection"]["b1/r64_rec"]["make_plan_host"] > 0
