"""Distillation training through upstream's unchanged `llava.train.train.train()`, on CPU.

Runs happen in this process (upstream's `train()` parses `sys.argv`), which saves the
import time of a subprocess per run; the trainer of each run is caught when upstream
calls `trainer.save_state()`.
"""
import functools
import math
import types
import os
import subprocess
import sys

import pytest
import torch

import sparsevlm_patch
from sparsevlm_patch.tiny import build_tiny_llava, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = build_tiny_llava(str(root / "model"))
    data = make_dataset(str(root / "data"), 8, seed=1)
    overfit = make_dataset(str(root / "overfit"), 2, seed=2)
    return {"root": root, "model": model, "clip": str(root / "model" / "clip"),
            "data": data, "overfit": overfit}


def upstream_flags(setup, out, data=None, steps=2):
    data = data or setup["data"]
    return [
        "--model_name_or_path", setup["model"], "--version", "v1",
        "--data_path", data, "--image_folder", os.path.dirname(data),
        "--vision_tower", setup["clip"], "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True", "--lazy_preprocess", "True",
        "--model_max_length", "2048", "--output_dir", str(out), "--max_steps", str(steps),
        "--per_device_train_batch_size", "2", "--report_to", "none",
        "--dataloader_num_workers", "0", "--use_cpu", "True", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--save_strategy", "no", "--seed", "0",
    ]


def train_in_process(monkeypatch, argv):
    """Run upstream's train() with `argv`; return its trainer."""
    from llava.train import llava_trainer
    from llava.train import train as llava_train

    caught = {}
    original = llava_trainer.LLaVATrainer.save_state

    def save_state(self):
        caught["trainer"] = self
        return original(self)

    monkeypatch.setattr(llava_trainer.LLaVATrainer, "save_state", save_state)
    monkeypatch.setattr(sys, "argv", ["train.py"] + argv)
    llava_train.train()
    return caught["trainer"]


def step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_sparse_flags_are_in_upstreams_parser():
    out = subprocess.run([sys.executable, "-m", "sparsevlm_patch.train", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    from sparsevlm_patch.flags import FLAGS

    for flag in [f"--{f.train}" for f in FLAGS if f.train] + ["--model_name_or_path", "--freeze_backbone"]:
        assert flag in out.stdout


@pytest.mark.parametrize("flags, message", [
    (["--pruning_layers", "2,x"], "--pruning_layers"),
    (["--keep_schedule", "66,80,17"], "--keep_schedule"),
    (["--keep_schedule", "66,30"], "--keep_schedule"),
    (["--pruning_layers", "0,6,15"], "--pruning_layers"),
    (["--retain_tokens", "-3"], "--retain_tokens"),
    (["--retain_tokens", "abc"], "--retain_tokens='abc' is not a number: expected a positive number"),
    (["--align_loss_weight", "-1"], "--align_loss_weight"),
    (["--align_loss_weight", "inf"], "--align_loss_weight=inf is not valid: expected a finite number"),
    (["--align_loss_weight", "nan"], "--align_loss_weight=nan is not valid: expected a finite number"),
    (["--sparse", "False", "--retain_tokens", "64"], "--retain_tokens"),
    (["--align_loss_weight", "0", "--teacher_model_name_or_path", "/some/teacher"], "--teacher_model_name_or_path"),
    (["--token_selection", "fast"], "--token_selection='fast' is not a selection rule: expected one of sparsevlm, "
                                    "sparsevlm_v2, fastv, random"),
    (["--selection_seed", "one"], "--selection_seed='one' is not a number"),
    (["--sparse", "False", "--token_selection", "random"], "--token_selection"),
])
def test_bad_flags_fail_before_loading(setup, tmp_path, monkeypatch, flags, message):
    from llava.train import train as llava_train

    loaded = []
    monkeypatch.setattr(llava_train.LlavaLlamaForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(a)))
    monkeypatch.setattr(sys, "argv", ["train.py"] + upstream_flags(setup, tmp_path) + flags)
    with pytest.raises(ValueError, match=message):
        llava_train.train()
    assert loaded == []


def test_layer_past_the_models_depth_names_the_flag(setup, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--pruning_layers='2,6,16'.*past the model's depth"):
        train_in_process(monkeypatch, upstream_flags(setup, tmp_path, steps=1) + ["--pruning_layers", "2,6,16"])


def test_unknown_flag_fails_as_upstream(setup, tmp_path, monkeypatch):
    from llava.train import train as llava_train

    monkeypatch.setattr(sys, "argv", ["train.py"] + upstream_flags(setup, tmp_path) + ["--retain_tokenz", "64"])
    with pytest.raises(ValueError, match="retain_tokenz"):
        llava_train.train()


def test_full_finetune_distillation_with_checkpointing(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    teacher_before = {k: v.clone() for k, v in _fresh_state_dict(setup["model"]).items()}
    trainer = train_in_process(monkeypatch, upstream_flags(setup, out, steps=3) + [
        "--retain_tokens", "64", "--gradient_checkpointing", "True", "--save_strategy", "no"])
    printed = capsys.readouterr().out
    assert "full fine-tuning: trainable parameters" in printed

    logs = step_logs(trainer)
    assert len(logs) == 3
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["lm_loss"])
        assert entry["align_loss"] > 0
        assert (entry["kept_visual_l2"], entry["kept_visual_l6"], entry["kept_visual_l15"]) == (66, 30, 17)
    assert logs[0]["loss"] == pytest.approx(logs[0]["lm_loss"] + logs[0]["align_loss"], rel=1e-4)

    # The teacher: frozen, dense, unchanged, not in the optimizer, not saved.
    teacher = trainer._sparsevlm_distill.teacher
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_state = teacher.state_dict()
    for name, value in teacher_before.items():
        if name in teacher_state:
            assert torch.equal(teacher_state[name], value), name
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    student = trainer.model
    assert optimized == {id(p) for p in student.parameters() if p.requires_grad}
    assert not sparsevlm_patch.last_stats(teacher)

    # What was saved loads and generates with plain upstream (no plugin imported).
    saved = os.listdir(out)
    assert "config.json" in saved
    _generate_without_plugin(str(out))


def test_distillation_with_the_v2_rule(setup, tmp_path, monkeypatch):
    """The student prunes with sparsevlm_v2 (its presets, no recycling), the teacher stays dense."""
    trainer = train_in_process(monkeypatch, upstream_flags(setup, tmp_path, steps=2) + [
        "--retain_tokens", "64", "--token_selection", "sparsevlm_v2"])
    for entry in step_logs(trainer):
        assert (entry["kept_visual_l2"], entry["kept_visual_l6"], entry["kept_visual_l15"]) == (66, 34, 20)
        assert entry["align_loss"] > 0 and math.isfinite(entry["loss"])
    stats = sparsevlm_patch.last_stats(trainer.model)
    assert stats["selection"] == "sparsevlm_v2" and stats["recycled"][0] == [0, 0, 0]
    assert not sparsevlm_patch.last_stats(trainer._sparsevlm_distill.teacher)


def test_align_loss_is_zero_for_identical_teacher_without_pruning(setup, tmp_path, monkeypatch):
    trainer = train_in_process(monkeypatch, upstream_flags(setup, tmp_path, steps=1) + [
        "--keep_schedule", "576,576,576", "--token_recycling", "False"])
    assert step_logs(trainer)[0]["align_loss"] == pytest.approx(0.0, abs=1e-10)


def test_align_weight_zero_is_plain_lm_training_with_pruning(setup, tmp_path, monkeypatch, capsys):
    with_teacher = step_logs(train_in_process(monkeypatch, upstream_flags(setup, tmp_path / "a", steps=1)
                                              + ["--retain_tokens", "64"]))
    capsys.readouterr()
    trainer = train_in_process(monkeypatch, upstream_flags(setup, tmp_path / "b", steps=2)
                               + ["--retain_tokens", "64", "--align_loss_weight", "0"])
    assert "teacher:" not in capsys.readouterr().out
    assert trainer._sparsevlm_distill.teacher is None
    logs = step_logs(trainer)
    assert all("align_loss" not in entry for entry in logs)
    assert all(entry["kept_visual_l15"] == 17 for entry in logs)
    # Same first batch, same weights: the LM loss is the one the distillation run computed.
    assert logs[0]["loss"] == pytest.approx(with_teacher[0]["lm_loss"], rel=1e-4)
    assert logs[0]["loss"] == pytest.approx(logs[0]["lm_loss"], rel=1e-4)


def test_dense_without_teacher_reproduces_upstream_exactly(setup, tmp_path):
    flags = upstream_flags(setup, tmp_path / "x", steps=3)
    env = {**os.environ, "SPARSEVLM": "0"}
    upstream = subprocess.run([sys.executable, "-m", "llava.train.train"] + flags, capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=600)
    assert upstream.returncode == 0, upstream.stderr[-3000:]
    flags = upstream_flags(setup, tmp_path / "y", steps=3) + ["--sparse", "False"]  # no teacher either
    ours = subprocess.run([sys.executable, "-m", "sparsevlm_patch.train"] + flags, capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert _losses(upstream.stdout + upstream.stderr) == _losses(ours.stdout + ours.stderr)
    assert len(_losses(ours.stdout + ours.stderr)) == 3


def test_total_loss_falls_when_overfitting(setup, tmp_path, monkeypatch):
    trainer = train_in_process(monkeypatch, upstream_flags(setup, tmp_path, data=setup["overfit"], steps=30)
                               + ["--retain_tokens", "64", "--learning_rate", "3e-3"])
    losses = [entry["loss"] for entry in step_logs(trainer)]
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


@pytest.mark.parametrize("mode, flags, trainable", [
    ("freeze backbone", ["--freeze_backbone", "True"], ("lm_head", "mm_projector")),
    ("projector only", ["--tune_mm_mlp_adapter", "True"], ("mm_projector",)),
    # upstream's LoRA recipe: --mm_projector_lr gives the projector its own (otherwise empty-paired) groups
    ("LoRA", ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-5"],
     ("lora_", "mm_projector")),
])
def test_training_modes(setup, tmp_path, monkeypatch, capsys, mode, flags, trainable):
    out = tmp_path / "run"
    trainer = train_in_process(monkeypatch, upstream_flags(setup, out) + ["--retain_tokens", "64"] + flags)
    assert f"sparsevlm_patch: {mode}" in capsys.readouterr().out
    logs = step_logs(trainer)
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) and e["align_loss"] >= 0 for e in logs)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all(any(t in n for t in trainable) for n in names), names
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    if mode == "projector only":
        assert os.path.exists(out / "mm_projector.bin")
        _generate_without_plugin(str(out), model_base=setup["model"])
    if mode == "LoRA":
        groups = trainer.optimizer.param_groups
        assert all(group["params"] for group in groups)  # DeepSpeed would drop empty ones under the scheduler
        assert len(trainer.lr_scheduler.base_lrs) == len(groups)
        projector = {id(p) for n, p in trainer.model.named_parameters() if "mm_projector" in n}
        for group in groups:
            in_projector = {id(p) in projector for p in group["params"]}
            assert len(in_projector) == 1
            assert group["initial_lr"] == (2e-5 if in_projector.pop() else 1e-3)
        assert os.path.exists(out / "non_lora_trainables.bin")
        _generate_without_plugin(str(out), model_base=setup["model"], name="tiny-llava-lora")


def test_raters_never_come_from_answers(setup):
    """Changing only an answer leaves the keep mask unchanged (training raters are the
    prompt tokens between the image and the first answer token)."""
    from llava.constants import IGNORE_INDEX
    from llava.mm_utils import process_images
    from PIL import Image

    from conftest import load_tiny_llava
    from sparsevlm_patch.tiny import make_images, prompt_ids

    tokenizer, model, processor = load_tiny_llava(setup["model"])
    sparsevlm_patch.enable(model, retain_tokens=64, recycle=False)
    folder = setup["root"] / "leak"
    name = make_images(str(folder), 1, seed=5)[0]
    image = process_images([Image.open(folder / name).convert("RGB")], processor, model.config)
    prompt = prompt_ids(tokenizer, "What color is the shape in the top-left cell?")

    def keep_mask(answer, with_labels=True):
        answer_ids = torch.tensor(tokenizer(answer, add_special_tokens=False).input_ids)
        ids = torch.cat([prompt, answer_ids])[None]
        labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer_ids])[None]
        with torch.no_grad():
            model(ids, images=image, labels=labels if with_labels else None)
        return sparsevlm_patch.last_keep_mask(model)[0, : len(prompt) + 575].clone()

    a, b = keep_mask("red red red red"), keep_mask("blue square gray circle")
    assert torch.equal(a, b)
    # Without labels (inference) the answer tokens would rate: the selection moves.
    assert not torch.equal(keep_mask("red red red red", False), keep_mask("blue square gray circle", False))

    # With a label smoother upstream's Trainer pops the labels before the forward; the
    # distillation loss keeps them for choosing raters, so the answers still never rate.
    # (The stand-in smoother: upstream's own cannot score LLaVA's spliced logits.)
    from transformers import Trainer

    from sparsevlm_patch import distill

    smoother = lambda outputs, labels, shift_labels=False: outputs["logits"].float().mean()  # noqa: E731
    trainer = types.SimpleNamespace(label_smoother=smoother, args=types.SimpleNamespace(past_index=-1))
    trainer.__dict__[distill.SETUP_ATTR] = distill.DistillSetup(None, 0.0, True, {})

    def keep_mask_smoothed(answer):
        answer_ids = torch.tensor(tokenizer(answer, add_special_tokens=False).input_ids)
        inputs = {"input_ids": torch.cat([prompt, answer_ids])[None], "images": image,
                  "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer_ids])[None]}
        with torch.no_grad():
            distill.compute_loss(functools.partial(Trainer.compute_loss, trainer), trainer, (model, inputs), {})
        return sparsevlm_patch.last_keep_mask(model)[0, : len(prompt) + 575].clone()

    assert torch.equal(keep_mask_smoothed("red red red red"), a)
    assert torch.equal(keep_mask_smoothed("blue square gray circle"), a)


def test_resume_from_checkpoint_continues(setup, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    flags = upstream_flags(setup, out, steps=2) + ["--retain_tokens", "64", "--save_strategy", "steps",
                                                  "--save_steps", "2"]
    first = step_logs(train_in_process(monkeypatch, flags))
    assert os.path.isdir(out / "checkpoint-2")
    flags = upstream_flags(setup, out, steps=3) + ["--retain_tokens", "64", "--save_strategy", "no"]
    trainer = train_in_process(monkeypatch, flags)  # upstream resumes from output_dir's checkpoint-*
    logs = step_logs(trainer)  # steps 1-2 come back from the checkpoint's state; 3 is new
    assert [e["step"] for e in logs] == [1, 2, 3]
    assert logs[:2] == first
    assert math.isfinite(logs[2]["loss"]) and logs[2]["kept_visual_l15"] == 17


def _fresh_state_dict(path):
    from llava.model import LlavaLlamaForCausalLM

    return LlavaLlamaForCausalLM.from_pretrained(path).state_dict()


def _losses(text):
    return [float(x) for x in __import__("re").findall(r"\{'loss': ([0-9.]+)", text)]


def _generate_without_plugin(path, model_base=None, name="tiny-llava-v1"):
    """Load `path` with upstream's own loader in a process without the plugin; generate."""
    script = f"""
import sys, torch
from llava.model.builder import load_pretrained_model
from llava.mm_utils import tokenizer_image_token
tok, model, proc, _ = load_pretrained_model({path!r}, {model_base!r}, {name!r}, device="cpu", device_map="cpu")
model.float().eval()
ids = tokenizer_image_token("USER: <image>\\nWhat is this? ASSISTANT:", tok, -200, return_tensors="pt")[None]
out = model.generate(ids, images=torch.zeros(1, 3, 336, 336), max_new_tokens=4, do_sample=False)
assert "sparsevlm_patch" not in sys.modules
print("GENERATED", out.shape[1])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SPARSEVLM": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GENERATED" in done.stdout


def test_bf16_teacher_takes_the_collators_fp32_images(tiny_llava, tiny_images):
    """On a GPU with --bf16, accelerate autocasts only the student's forward: the teacher gets
    the collator's fp32 images and must still run in its own dtype."""
    from llava.mm_utils import process_images

    from sparsevlm_patch.distill import teacher_hidden
    from sparsevlm_patch.tiny import prompt_ids

    tokenizer, model, image_processor = tiny_llava
    teacher = model.to(torch.bfloat16)
    sparsevlm_patch.disable(teacher)
    pixels = process_images(tiny_images, image_processor, model.config)
    assert pixels.dtype == torch.float32
    ids = torch.stack([prompt_ids(tokenizer, "What color is the circle?")] * len(tiny_images))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "images": pixels}
    hidden = teacher_hidden(teacher, inputs)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden.float()).all()
    cast = teacher_hidden(teacher, dict(inputs, images=pixels.to(torch.bfloat16)))
    assert torch.equal(hidden, cast)


def test_training_says_the_environment_is_not_used(setup, tmp_path, monkeypatch):
    """Training is configured by its flags; SPARSEVLM_* in the environment is not silently dropped."""
    monkeypatch.setenv("SPARSEVLM_RETAIN", "128")
    with pytest.warns(UserWarning, match="SPARSEVLM_RETAIN=128 set in the environment but not used"):
        trainer = train_in_process(monkeypatch, upstream_flags(setup, tmp_path, steps=1) + ["--retain_tokens", "64"])
    assert sparsevlm_patch.last_stats(trainer.model)["kept_visual"][0] == [66, 30, 17]


def test_an_optimizer_the_user_passed_keeps_its_groups():
    """Only the optimizer upstream builds loses its empty groups; one passed in through
    `optimizers=` (with the user's own scheduler built on it) is left as it is."""
    from sparsevlm_patch.trainer_fixes import drop_empty_param_groups

    weight = torch.nn.Parameter(torch.zeros(2))
    groups = lambda: [{"params": [weight]}, {"params": [], "lr": 0.5}]  # noqa: E731
    passed = torch.optim.AdamW(groups(), lr=0.1)
    trainer = types.SimpleNamespace(optimizer=passed)
    assert drop_empty_param_groups(lambda: trainer.optimizer, trainer, (), {}) is passed
    assert len(passed.param_groups) == 2
    built = types.SimpleNamespace(optimizer=None)
    optimizer = drop_empty_param_groups(lambda: torch.optim.AdamW(groups(), lr=0.1), built, (), {})
    assert len(optimizer.param_groups) == 1
