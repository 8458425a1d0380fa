"""The LLaVA training stages, each one run of upstream's `llava.train.train` through the plugin's
entry (`python -m sparsevlm_patch.train <upstream flags>`), as a LLaVA user runs it:

  pretrain   `--version plain`, `--tune_mm_mlp_adapter True`: the projector alone on captions;
  finetune   `--version chatml_direct` (ChatML, SmolLM2's chat format), the whole LM + projector,
             the tower frozen; dense (`--sparse False`);
  distill    from the fine-tuned model, sparse at a budget with a rule (`--token_selection`),
             the fine-tuned model as the frozen dense teacher;
  control    the same extra steps as a distillation, dense (`--sparse False`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prepare_lm(out_dir: str, *, tiny: bool, dtype) -> dict:
    """SmolLM2-135M-Instruct (or, with `tiny`, a random 16-layer Llama of hidden 64 and the same
    tokenizer, for the CPU smoke test) saved for `--model_name_or_path`.

    The tokenizer adds `<|endoftext|>` as a BOS, where SmolLM2 adds none. Upstream's
    `chatml_direct` label masking (`preprocess_mpt`) counts each round's tokens without the
    `<|im_end|>` that ends it, which a BOS in each round's count makes up for; upstream then pads
    with the UNK token, also `<|endoftext|>`, so the BOS is masked out of attention in training
    (and in `evaluate`). Without it, upstream's `tokenizer_image_token` would also take the
    GGUF's BOS id, `<|im_start|>`, which starts every ChatML prompt, for a BOS, and drop the
    first token of every later text chunk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import smollm

    if tiny:
        from gguf import GGUFReader

        tokenizer = smollm.build_tokenizer(GGUFReader(smollm.gguf_path()))
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=16,
            num_attention_heads=2, num_key_value_heads=1, rope_theta=1e5, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    else:
        model, tokenizer = smollm.load_smollm2()
    from tokenizers import processors

    tokenizer.bos_token = "<|endoftext|>"
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)])
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"model": "random tiny Llama" if tiny else "SmolLM2-135M-Instruct (Q4_1 GGUF)",
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def deepspeed_stand_in(work: str) -> Optional[str]:
    """A folder holding a stand-in `deepspeed` package, or None when deepspeed is installed.

    Upstream's save of a `--tune_mm_mlp_adapter` run goes through `maybe_zero_3`, which imports
    `deepspeed.zero` even without ZeRO-3. The GPU machine has no deepspeed; the stand-in (no
    package metadata, so transformers still sees no deepspeed) only satisfies that import."""
    if importlib.util.find_spec("deepspeed") is not None:
        return None
    root = os.path.join(work, "deepspeed_stand_in")
    files = {
        "deepspeed/__init__.py": "from . import zero\n",
        "deepspeed/zero/__init__.py": "class GatheredParameters:\n    def __init__(self, *a, **k):\n"
                                      "        raise RuntimeError('no ZeRO-3 without deepspeed')\n",
        "deepspeed/runtime/__init__.py": "",
        "deepspeed/runtime/zero/__init__.py": "",
        "deepspeed/runtime/zero/partition_parameters.py":
            "import enum\n\n\nclass ZeroParamStatus(enum.Enum):\n    AVAILABLE = 1\n    NOT_AVAILABLE = 2\n"
            "    INFLIGHT = 3\n",
    }
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as handle:
            handle.write(text)
    return root


def flags(p, *, model: str, version: str, data: str, out: str, steps: int, lr: float, paths: dict,
          extra: List[str] = ()) -> List[str]:
    """Upstream's training flags (its scripts' values where they apply) for a stage."""
    out_flags = [
        "--model_name_or_path", model, "--version", version, "--data_path", data,
        "--image_folder", paths["image_folder"], "--vision_tower", paths["tower"],
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--group_by_modality_length", "False", "--lazy_preprocess", "True",
        "--model_max_length", "2048", "--output_dir", out, "--max_steps", str(steps),
        "--per_device_train_batch_size", str(p.batch), "--gradient_accumulation_steps", "1",
        "--learning_rate", f"{lr:g}", "--weight_decay", "0.", "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine", "--logging_steps", str(max(1, steps // 20)), "--report_to", "none",
        "--dataloader_num_workers", str(p.workers), "--seed", str(p.seed), "--disable_tqdm", "True",
        "--save_strategy", "no", "--gradient_checkpointing", "False",
    ]
    out_flags += ["--use_cpu", "True"] if p.device == "cpu" else ["--bf16", "True", "--tf32", "True"]
    return out_flags + list(extra)


def run(name: str, argv_flags: List[str], work: str, log) -> dict:
    """One `python -m sparsevlm_patch.train` run; its output goes to logs/<name>.log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SPARSEVLM="1")
    stand_in = deepspeed_stand_in(work)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, stand_in, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "sparsevlm_patch.train"] + argv_flags
    command = " ".join(["python -m sparsevlm_patch.train"] + [a.replace(work, "$WORK") for a in argv_flags])
    log(f"start {name}: {command}")
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    log_path = os.path.join(work, "logs", f"{name}.log")
    started = time.time()
    with open(log_path, "w") as handle:
        handle.write("$ " + command + "\n")
        handle.flush()
        code = subprocess.call(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    with open(log_path) as handle:
        text = handle.read()
    if code != 0:
        raise RuntimeError(f"stage {name} failed (exit {code}); log tail:\n{text[-4000:]}")
    if "WARNING: tokenization mismatch" in text:
        raise RuntimeError(f"stage {name}: upstream reports a tokenization mismatch (labels masked); see {log_path}")
    out = argv_flags[argv_flags.index("--output_dir") + 1]
    summary = {"command": command, "seconds": round(time.time() - started, 1)}
    state = os.path.join(out, "trainer_state.json")
    if os.path.exists(state):
        with open(state) as handle:
            history = json.load(handle)["log_history"]
        for key in ("loss", "lm_loss", "align_loss"):
            values = [(e["step"], e[key]) for e in history if key in e]
            if values:
                summary[f"{key}_first"], summary[f"{key}_last"] = values[0][1], values[-1][1]
                summary["steps"] = values[-1][0]
    log(f"done {name}: {summary}")
    return summary


def pretrain(p, paths: dict, work: str, log) -> dict:
    out = os.path.join(work, "pretrain")
    summary = run("pretrain", flags(p, model=paths["lm"], version="plain", data=paths["pretrain"], out=out,
                                    steps=p.pretrain_steps, lr=p.pretrain_lr, paths=paths,
                                    extra=["--tune_mm_mlp_adapter", "True", "--sparse", "False"]), work, log)
    paths["projector"] = os.path.join(out, "mm_projector.bin")
    return summary


def finetune(p, paths: dict, work: str, log) -> dict:
    out = os.path.join(work, "llava-smollm2-finetune")  # upstream's loaders look for "llava" in the name
    summary = run("finetune", flags(p, model=paths["lm"], version="chatml_direct", data=paths["train"], out=out,
                                    steps=p.finetune_steps, lr=p.finetune_lr, paths=paths,
                                    extra=["--pretrain_mm_mlp_adapter", paths["projector"], "--sparse", "False"]),
                  work, log)
    paths["finetuned"] = out
    return summary


def continue_training(p, paths: dict, work: str, log, name: str, sparse: Optional[dict]) -> dict:
    """`p.distill_steps` more steps from the fine-tuned model: distillation when `sparse` gives
    {"selection", "retain"}, else the dense control."""
    out = os.path.join(work, f"llava-smollm2-{name}")
    extra = (["--sparse", "True", "--retain_tokens", str(sparse["retain"]), "--token_selection",
              sparse["selection"], "--teacher_model_name_or_path", paths["finetuned"]]
             if sparse else ["--sparse", "False"])
    summary = run(name, flags(p, model=paths["finetuned"], version="chatml_direct", data=paths["train"], out=out,
                              steps=p.distill_steps, lr=p.distill_lr, paths=paths, extra=extra), work, log)
    paths[name] = out
    return summary
