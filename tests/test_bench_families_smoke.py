"""The model-families GPU benchmark (benchmarks/bench_families.py, issue 14) on tiny shapes on the CPU.

Llama, Mistral and Qwen2 LLaVAs (llava-torch's and llavaction's own classes) each build, splice,
prune with the preset counts, time dense vs retain 64 and generate, without error and without a
family skipped, so the one-call device run does not fail on code that changed since it was last
run.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"llama": "LlavaLlamaForCausalLM", "mistral": "LlavaMistralForCausalLM",
            "qwen2": "LlavaQwenForCausalLM"}
EXPECTED_CHECKS = {"sdpa", "dense_finite", "sparse_finite", "kept_visual_preset_r64", "pruned",
                   "retain576_equals_dense", "timed_sparse_pruned", "generate_finite",
                   "generate_kept_visual_preset_r64"}


def test_families_benchmark_runs_on_tiny_shapes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEVLM")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_families.py"), "--tiny",
                           "--out", str(tmp_path), "--label", "smoke"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((tmp_path / "bench_families.json").read_text())
    assert results["errors"] == [], results["errors"]
    assert results["skipped"] == [], results["skipped"]
    assert results["checks"] and all(results["checks"].values()), \
        {k: v for k, v in results["checks"].items() if not v}
    meta = results["meta"]
    assert meta["label"] == "smoke" and meta["tiny"] is True and meta["torch"] and meta["date"]

    families = results["families"]
    assert list(families) == list(FAMILIES), list(families)
    for name, llava_class in FAMILIES.items():
        res = families[name]
        assert res["status"] == "ok" and res["llava_class"] == llava_class, (name, res["status"])
        assert set(res["checks"]) == EXPECTED_CHECKS and all(res["checks"].values()), (name, res["checks"])
        assert res["kept_visual"] == [66, 30, 17] and res["visual_tokens"] == 576, (name, res)
        prefill = res["prefill"]
        assert prefill["dense_ms"] > 0 and prefill["sparse_ms"] > 0 and prefill["speedup"] > 0, (name, prefill)
        assert prefill["speedup_over_llama"] > 0, (name, prefill)
        assert res["generate_b1"]["new_tokens"] >= 1 and res["generate_b1"]["kept_visual"] == [[66, 30, 17]]
    assert families["llama"]["prefill"]["speedup_over_llama"] == 1.0
    # the models are the families' own classes: grouped-query attention and Qwen2's shapes kept
    assert families["mistral"]["shapes"]["kv_heads"] < families["mistral"]["shapes"]["heads"]
    assert families["qwen2"]["attention"] == "Qwen2SdpaAttention"
    assert "| qwen2 | LlavaQwenForCausalLM | ok |" in proc.stdout
