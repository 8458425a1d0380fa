"""DeepSpeed through the launcher on CPU (gloo, two processes): the distributed path stays
exercised. Under ZeRO-3 the student is partitioned while the teacher, loaded outside
zero.Init, stays whole on every rank.

(Losses of ZeRO-3 runs are not compared here: on CPU, upstream's own dense training under
ZeRO-3 gives run-to-run different, sometimes NaN, first-step losses with this stack.)"""
import re
import json
import os
import subprocess
import sys

import pytest

from test_train import ROOT, setup, upstream_flags  # noqa: F401  (setup: the shared fixture)

ZERO = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


def torchrun(setup, tmp_path, stage: int, port: int, sparse_flags):
    config = tmp_path / f"zero{stage}.json"
    zero = {"stage": stage, **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})}
    config.write_text(json.dumps({**ZERO, "zero_optimization": zero}))
    flags = upstream_flags(setup, tmp_path / f"out{stage}", steps=2)
    i = flags.index("--use_cpu")
    flags = flags[:i] + flags[i + 2:]  # without --use_cpu accelerate would quietly pick DDP
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
               "--master_port", str(port), os.path.join(ROOT, "sparsevlm_patch", "train.py")] + flags + [
        "--deepspeed", str(config)] + sparse_flags
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "student runs as DeepSpeedEngine" in log
    teacher_sizes = {int(n.replace(",", "")) for n in re.findall(r"([0-9,]+) parameters on this rank", log)}
    assert os.path.exists(tmp_path / f"out{stage}" / "config.json")
    # upstream's train() ends with trainer.save_state(): the logged steps are in trainer_state.json
    history = json.loads((tmp_path / f"out{stage}" / "trainer_state.json").read_text())["log_history"]
    steps = [(e["loss"], e["lm_loss"], e["kept_visual_l15"], e["align_loss"]) for e in history if "loss" in e]
    assert len(steps) == 2, history
    return steps, teacher_sizes


def test_zero2_and_zero3_distillation_under_torchrun(setup, tmp_path):
    zero2, teacher2 = torchrun(setup, tmp_path, 2, 29533, ["--retain_tokens", "64"])
    for loss, lm, kept, align in zero2:
        assert kept == 17 and align > 0 and loss == pytest.approx(lm + align, rel=1e-4)
    zero3, teacher3 = torchrun(setup, tmp_path, 3, 29534, ["--retain_tokens", "64"])
    assert [kept for _, _, kept, _ in zero3] == [17, 17]
    assert len(teacher2) == 1 and teacher2 == teacher3 and teacher3.pop() > 0  # whole, not partitioned


def test_upstream_zero3_auto_prefetch_bucket_becomes_an_integer(tmp_path):
    """transformers 4.37 fills upstream's "auto" ZeRO-3 prefetch bucket with 0.9 x hidden^2, a
    float that DeepSpeed's config refuses; the plugin rounds it."""
    import types

    import sparsevlm_patch  # noqa: F401
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = HfTrainerDeepSpeedConfig({**ZERO, "zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto"}})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64)), 10)
    zero = config.config["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 3686 and isinstance(zero["stage3_prefetch_bucket_size"], int)
    assert zero["reduce_bucket_size"] == 4096 and zero["stage3_param_persistence_threshold"] == 640


def test_train_entry_closes_the_process_group_after_upstreams_train(tmp_path, monkeypatch):
    import torch.distributed as dist
    from llava.train import train as llava_train

    from sparsevlm_patch import train as entry

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = []
        monkeypatch.setattr(llava_train, "train", lambda: calls.append(dist.is_initialized()))
        entry.main()
        assert calls == [True] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
