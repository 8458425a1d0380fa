"""DeepSpeed ZeRO-2 through the launcher, on CPU (gloo): the distributed path stays exercised."""
import json
import os
import re
import subprocess
import sys

from test_train import ROOT, setup, upstream_flags  # noqa: F401  (setup: the shared fixture)

ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
         "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
         "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def test_zero2_distillation_under_torchrun_two_processes(setup, tmp_path):
    config = tmp_path / "zero2.json"
    config.write_text(json.dumps(ZERO2))
    flags = _without(upstream_flags(setup, tmp_path / "out", steps=2), "--use_cpu")
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
               "--master_port", "29533", os.path.join(ROOT, "sparsevlm_patch", "train.py")] + flags + [
        "--retain_tokens", "64", "--deepspeed", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "student runs as DeepSpeedEngine" in log
    steps = re.findall(r"\{'loss': ([0-9.]+), .*?'align_loss': ([0-9.e-]+)", log)
    assert len(steps) == 2, log[-3000:]
    assert "'kept_visual_l15': 17.0" in log
    assert os.path.exists(tmp_path / "out" / "config.json")


def _without(flags, name):
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]
