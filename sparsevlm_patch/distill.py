"""Teacher-student distillation inside upstream's `LLaVATrainer`.

`compute_loss` (installed on LLaVATrainer by the hooks) runs the sparse student as
upstream does (LM loss from upstream's own forward), runs the frozen dense teacher on
the same batch without grad, and adds `align_loss_weight` x MSE between their last
hidden states on the tokens the student kept.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, make_dataclass
from typing import Optional

import torch

from .config import SparseConfig, env_enabled, make_config
from .families import check_prunable
from .flags import BY_KEY, CONFIG_KEYS, ENV_NAMES, FLAGS, TRAIN_NAMES
from .state import configure, disable, get_state, language_model, last_keep_mask, unwrap

SETUP_ATTR = "_sparsevlm_distill"
CONFIG_ATTR = "_sparsevlm_student_config"
TEACHER_CONFIG_FIELDS = (
    "image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length", "mm_use_im_start_end",
    "mm_use_im_patch_token", "mm_patch_merge_type", "image_grid_pinpoints", "mm_vision_select_layer",
    "mm_vision_select_feature",
)
_COMPUTE_LOSS_SIGNATURE = inspect.Signature([
    inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("return_outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False)])


@dataclass
class DistillSetup:
    teacher: Optional[torch.nn.Module]
    align_loss_weight: float
    sparse: bool
    metrics: dict  # running sums since the last log: name -> [sum tensor, count]


def _arg(args, key: str):
    """The training flag of `key` (flags.py); its default when a trainer's args lack it (own launchers)."""
    flag = BY_KEY[key]
    value = getattr(args, flag.train, None)
    if value is None and key == "align_loss_weight":
        # Distillation goes with pruning; `--sparse False` alone is upstream's training.
        return 1.0 if _arg(args, "sparse") else 0.0
    return flag.default if value is None else value


def student_config(args, num_layers: Optional[int] = None) -> SparseConfig:
    """The student's sparse configuration from the training flags (None: the flag's default)."""
    values = {key: getattr(args, BY_KEY[key].train, None) for key in CONFIG_KEYS if BY_KEY[key].train}
    return make_config(**{k: v for k, v in values.items() if v is not None}, num_layers=num_layers,
                       names=TRAIN_NAMES)


def training_arguments_class(base):
    """Upstream's TrainingArguments plus the sparse and distillation flags of flags.FLAGS.

    Flags the plugin parses itself are strings, so that a bad value gets the plugin's message
    (what is allowed), not argparse's; `None` means the flag's default."""
    fields = [(flag.train, flag.train_type if flag.train_type is bool else Optional[flag.train_type],
               field(default=flag.default if flag.train_type is bool else None, metadata={"help": flag.help}))
              for flag in FLAGS if flag.train]

    def __post_init__(self):
        check_flags(self)  # before any model is loaded
        base.__post_init__(self)

    cls = make_dataclass("SparseTrainingArguments", fields, bases=(base,),
                         namespace={"__post_init__": __post_init__})
    # Picklable (the Trainer saves its args): a module attribute under the class's own name.
    cls.__module__ = __name__
    globals()["SparseTrainingArguments"] = cls
    return cls


def training_mode(args, model) -> str:
    if getattr(args, "lora_enable", False):
        return "LoRA"
    if getattr(args, "tune_mm_mlp_adapter", False):
        return "projector only (tune_mm_mlp_adapter)"
    # --freeze_backbone is a model argument the trainer never sees: read it off the model.
    if not any(p.requires_grad for p in language_model(model).layers.parameters()):
        return "freeze backbone"
    return "full fine-tuning"


def parameter_counts(model) -> tuple:
    params = list(unwrap(model).parameters()) if not hasattr(model, "get_base_model") else list(model.parameters())
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions report 0)
    trainable = sum(size(p) for p in params if p.requires_grad)
    return trainable, sum(size(p) for p in params)


@contextmanager
def _outside_zero3():
    """Under DeepSpeed ZeRO-3 `from_pretrained` partitions a model for the engine being built;
    the teacher belongs to no engine, so it is loaded whole (replicated on every rank, frozen)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _teacher_vision_tower(student, device):
    """The student's frozen vision tower, shared with the teacher; under ZeRO-3 (where the
    student's engine owns and re-partitions it) a whole copy loaded from the same weights,
    in the same dtype, so both still see identical image features."""
    from llava.model.multimodal_encoder.builder import build_vision_tower

    tower = student.get_model().get_vision_tower()
    params = list(tower.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return tower
    with _outside_zero3():
        copy_ = build_vision_tower(student.config)
    return copy_.to(device=device, dtype=params[0].dtype).requires_grad_(False)


def load_teacher(student, path: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """The frozen dense teacher: the student's upstream class (LlavaLlamaForCausalLM,
    LlavaMistralForCausalLM) loaded from `path`, sharing the student's (frozen) vision tower
    so both see identical image features."""
    student = unwrap(student)
    with _outside_zero3():
        teacher = type(student).from_pretrained(
            path, torch_dtype=dtype, attn_implementation=student.config._attn_implementation)
    for name in TEACHER_CONFIG_FIELDS:
        if hasattr(student.config, name):
            setattr(teacher.config, name, getattr(student.config, name))
    inner, student_inner = teacher.get_model(), student.get_model()
    # Share, not register: the tower must not become a teacher parameter (dtype, device, freezing).
    inner._modules.pop("vision_tower", None)
    inner.__dict__["vision_tower"] = _teacher_vision_tower(student, device)
    if not hasattr(inner, "mm_projector"):
        # A text-only checkpoint (e.g. projector pretraining from Vicuna): the teacher sees the
        # images through a frozen copy of the student's initial projector.
        inner.mm_projector = copy.deepcopy(student_inner.mm_projector)
        teacher.config.mm_hidden_size = student.config.mm_hidden_size
    vocab = student.get_input_embeddings().num_embeddings  # true size also when ZeRO-3 partitions it
    if teacher.get_input_embeddings().num_embeddings != vocab:
        with _outside_zero3():
            teacher.resize_token_embeddings(vocab)
    teacher.to(device=device, dtype=dtype)
    teacher.requires_grad_(False)
    teacher.eval()
    disable(teacher)
    return teacher


def check_depth_at_init(wrapped, trainer, args, kwargs):
    """LLaVATrainer.__init__: the student is loaded, so a language model the plugin cannot
    prune or a pruning layer past its depth fails now, under the flag's name, before the
    teacher loads or any step runs."""
    wrapped(*args, **kwargs)
    if _arg(trainer.args, "sparse"):
        _check_student(trainer.model)
        trainer.__dict__[CONFIG_ATTR] = student_config(trainer.args, unwrap(trainer.model).config.num_hidden_layers)


def _check_student(model) -> None:
    check_prunable(model, f"{TRAIN_NAMES['sparse']} True (the student)",
                   f"{TRAIN_NAMES['sparse']} False runs upstream's training (no pruning, no teacher).")


def _setup(trainer, model) -> DistillSetup:
    setup = trainer.__dict__.get(SETUP_ATTR)
    if setup is not None:
        return setup
    args = trainer.args
    _warn_unused_environment()
    student = unwrap(model)
    if _arg(args, "sparse"):
        _check_student(student)  # again here: the hooks may have been installed after __init__
        config = trainer.__dict__.get(CONFIG_ATTR) or student_config(args, student.config.num_hidden_layers)
        configure(student, config)
    else:
        disable(student)
    weight = float(_arg(args, "align_loss_weight"))
    teacher = None
    if weight > 0:
        path = _arg(args, "teacher_model_name_or_path") or student.config._name_or_path
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        teacher = load_teacher(student, path, dtype, args.device)
    trainable, total = parameter_counts(model)
    if args.process_index == 0:
        print(f"sparsevlm_patch: {training_mode(args, model)}: trainable parameters {trainable:,} / {total:,} "
              f"({100 * trainable / max(total, 1):.4f}%), teacher excluded"
              f"{'' if teacher is None else _describe_teacher(teacher, path)}; "
              f"student runs as {type(model).__name__}", flush=True)
    setup = DistillSetup(teacher, weight, bool(_arg(args, "sparse")), {})
    trainer.__dict__[SETUP_ATTR] = setup
    return setup


def _warn_unused_environment() -> None:
    """Training is configured by its flags; say so if the environment asks for something else."""
    unused = [f"{env}={os.environ[env]}" for env in ENV_NAMES.values() if env in os.environ]
    if not env_enabled():
        unused.append(f"SPARSEVLM={os.environ['SPARSEVLM']}")
    if unused:
        flags = ", ".join(TRAIN_NAMES[key] for key in ("sparse",) + CONFIG_KEYS if key in TRAIN_NAMES)
        warnings.warn(f"sparsevlm_patch: {', '.join(unused)} set in the environment but not used: training "
                      f"reads its flags ({flags})", stacklevel=2)


def _describe_teacher(teacher, path: str) -> str:
    whole = sum(p.numel() for p in teacher.parameters())  # 0 if it had been partitioned
    return f" (teacher: {path}, {whole:,} parameters on this rank, frozen, dense)"


class _Capture:
    """Captures a LlamaModel's attention mask (pre-hook) and final-norm output (hook)."""

    def __init__(self, inner):
        self.mask = self.hidden = None
        self.handles = [
            inner.register_forward_pre_hook(self._pre, with_kwargs=True),
            inner.norm.register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        self.mask = kwargs.get("attention_mask")

    def _post(self, module, args, output):
        self.hidden = output

    def close(self):
        for h in self.handles:
            h.remove()


def teacher_hidden(teacher, inputs: dict) -> torch.Tensor:
    """Teacher's last hidden state on the batch (no LM head, no grad).

    The images go in the teacher's dtype: with `--bf16` on a GPU, accelerate runs only the
    student's forward under autocast, and upstream's tower returns features in the images'
    dtype (fp32 from the collator), which a bf16 projector would refuse."""
    images = inputs.get("images")
    dtype = teacher.get_model().embed_tokens.weight.dtype
    if torch.is_tensor(images):
        images = images.to(dtype)
    elif isinstance(images, (list, tuple)):
        images = [image.to(dtype) for image in images]
    with torch.no_grad():
        # By keyword, and by index: LLaVA-NeXT's splice takes `modalities` before `image_sizes`
        # and returns one value more than LLaVA's.
        spliced = teacher.prepare_inputs_labels_for_multimodal(
            inputs["input_ids"], None, inputs.get("attention_mask"), None, None, images,
            image_sizes=inputs.get("image_sizes"))
        position_ids, attention_mask, embeds = spliced[1], spliced[2], spliced[4]
        out = teacher.get_model()(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def align_loss(student_hidden, teacher_hidden, keep) -> torch.Tensor:
    """MSE over hidden units, averaged over the kept (valid) tokens."""
    per_token = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    keep = keep.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp(min=1)


def compute_loss(wrapped, trainer, args, kwargs):
    """LLaVATrainer.compute_loss: LM loss + align_loss_weight x alignment loss."""
    bound = _COMPUTE_LOSS_SIGNATURE.bind(*args, **kwargs)
    model, inputs = bound.arguments["model"], bound.arguments["inputs"]
    return_outputs = bound.arguments.get("return_outputs", False)
    setup = _setup(trainer, model)
    inner = language_model(model)
    state = get_state(inner)
    capture = _Capture(inner)
    try:
        state.rater_labels = inputs.get("labels")  # kept for the raters even if the Trainer pops them
        loss, outputs = wrapped(model, inputs, return_outputs=True)
    finally:
        state.rater_labels = None
        capture.close()
    if not model.training:  # evaluation: no training metrics
        if setup.teacher is not None:
            loss = loss + setup.align_loss_weight * _align(setup, model, capture, inputs)
        return (loss, outputs) if return_outputs else loss
    _add_metric(setup, "lm_loss", loss.detach())
    if setup.sparse:
        stats = getattr(get_state(inner), "stats", None) or {}
        for layer, kept in zip(stats.get("pruning_layers", []), zip(*stats.get("kept_visual", [[]]))):
            _add_metric(setup, f"kept_visual_l{layer}", torch.tensor(sum(kept) / max(len(kept), 1)).to(loss.device))
    if setup.teacher is not None:
        align = _align(setup, model, capture, inputs)
        _add_metric(setup, "align_loss", align.detach())
        loss = loss + setup.align_loss_weight * align
    return (loss, outputs) if return_outputs else loss


def _align(setup: DistillSetup, model, capture: "_Capture", inputs: dict) -> torch.Tensor:
    keep = last_keep_mask(model) if setup.sparse else None
    if keep is None:
        mask = capture.mask
        keep = (mask.bool() if mask is not None
                else torch.ones(capture.hidden.shape[:2], dtype=torch.bool, device=capture.hidden.device))
    return align_loss(capture.hidden, teacher_hidden(setup.teacher, inputs), keep)


def _add_metric(setup: DistillSetup, name: str, value: torch.Tensor) -> None:
    total = setup.metrics.setdefault(name, [0.0, 0])
    total[0] = total[0] + value.float()
    total[1] += 1


def log(wrapped, trainer, args, kwargs):
    """LLaVATrainer.log: adds the distillation metrics averaged since the last log."""
    logs = args[0] if args else kwargs["logs"]
    setup = trainer.__dict__.get(SETUP_ATTR)
    if setup is not None and "loss" in logs and setup.metrics:
        names = sorted(setup.metrics)
        means = torch.stack([setup.metrics[n][0] / setup.metrics[n][1] for n in names])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank logs at the same steps: average over ranks, as the Trainer does for `loss`.
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
        logs.update(zip(names, means.tolist()))
        setup.metrics.clear()
    return wrapped(*args, **kwargs)


def check_flags(args) -> None:
    """Validate the sparse training flags (before any model is loaded)."""
    if not _arg(args, "sparse"):
        for key in CONFIG_KEYS:
            name = BY_KEY[key].train
            if name and getattr(args, name, None) is not None:
                raise ValueError(f"--{name}={getattr(args, name)!r} is set but --sparse is False: drop "
                                 f"--{name}, or prune with --sparse True")
    student_config(args)
    weight = _arg(args, "align_loss_weight")
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"--align_loss_weight={weight!r} is not valid: expected a finite number >= 0 "
                         "(0 turns the teacher off)")
    teacher = _arg(args, "teacher_model_name_or_path")
    if weight == 0 and teacher:
        raise ValueError(f"--teacher_model_name_or_path={teacher!r} is set but --align_loss_weight is 0, "
                         "(the default with --sparse False), which loads no teacher: give a weight > 0 "
                         "or drop the teacher path")
