"""The patch table: every upstream symbol the plugin wraps, one row each.

wrapt post-import hooks install a module's rows when it is imported (or at once if it
already is), so `import sparsevlm_patch` may come before or after `import llava`. Each row's
upstream signature is checked (compat.py) before it is wrapped; `remove()` walks the table
back and puts the exact original objects in place.

A new model family or trainer fix is one row here plus its wrapper elsewhere. Nothing in
the package imports this module but the public API and the entry scripts.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Tuple

import wrapt

from . import compat, controller, distill, trainer_fixes
from .config import config_from_env, env_enabled


@dataclass(frozen=True)
class Patch:
    module: str  # the upstream module that defines the symbol
    path: str  # "Class.method", or a module-level name
    wrapper: Callable  # wrapt wrapper (wrapped, instance, args, kwargs); with `replace`, original -> new
    params: Tuple[str, ...]  # upstream's parameters (a class: its fields the replacement relies on)
    replace: bool = False  # put `wrapper(original)` in place instead of wrapping


_LLAMA = "transformers.models.llama.modeling_llama"
_MISTRAL = "transformers.models.mistral.modeling_mistral"
_LLAVA_LLAMA = "llava.model.language_model.llava_llama"
_LLAVA_MISTRAL = "llava.model.language_model.llava_mistral"
_QWEN2 = "transformers.models.qwen2.modeling_qwen2"
# LLaVA-NeXT's Qwen2 LLaVA, as PyPI's `llavaction` ships it. Its splice and encode_images are
# LlavaMetaForCausalLM's (llavaction.model.llava_arch), wrapped here on LlavaQwenForCausalLM,
# which inherits them: rows are keyed by "Class.method" (compat.EXPECTED), and
# "LlavaMetaForCausalLM.<method>" already names llava-torch's rows.
_LLAVA_QWEN = "llavaction.model.language_model.llava_qwen"
_LM_FORWARD = ("self", "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
               "use_cache", "output_attentions", "output_hidden_states", "return_dict")
_LLAVA_FORWARD = ("self", "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
                  "labels", "use_cache", "output_attentions", "output_hidden_states", "images", "image_sizes",
                  "return_dict")
_TRAINER = "llava.train.llava_trainer"

PATCHES = (
    # inference: each family's language model (families.py) and its RoPE
    Patch(_LLAMA, "LlamaModel.forward", controller.lm_forward, _LM_FORWARD),
    Patch(_LLAMA, "LlamaRotaryEmbedding.forward", controller.rope_forward, ("self", "x", "seq_len")),
    Patch(_MISTRAL, "MistralModel.forward", controller.lm_forward, _LM_FORWARD),
    Patch(_MISTRAL, "MistralRotaryEmbedding.forward", controller.rope_forward, ("self", "x", "seq_len")),
    Patch(_QWEN2, "Qwen2Model.forward", controller.lm_forward, _LM_FORWARD),
    Patch(_QWEN2, "Qwen2RotaryEmbedding.forward", controller.rope_forward, ("self", "x", "seq_len")),
    Patch("llava.model.llava_arch", "LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal",
          controller.prepare_multimodal,
          ("self", "input_ids", "position_ids", "attention_mask", "past_key_values", "labels", "images",
           "image_sizes")),
    Patch("llava.model.llava_arch", "LlavaMetaForCausalLM.encode_images", controller.encode_images,
          ("self", "images")),
    Patch(_LLAVA_LLAMA, "LlavaLlamaForCausalLM.forward", controller.call_scope, _LLAVA_FORWARD),
    Patch(_LLAVA_LLAMA, "LlavaLlamaForCausalLM.generate", controller.call_scope,
          ("self", "inputs", "images", "image_sizes", "kwargs")),
    Patch(_LLAVA_MISTRAL, "LlavaMistralForCausalLM.forward", controller.call_scope, _LLAVA_FORWARD),
    Patch(_LLAVA_MISTRAL, "LlavaMistralForCausalLM.generate", controller.call_scope,
          ("self", "inputs", "images", "image_sizes", "kwargs")),
    Patch(_LLAVA_QWEN, "LlavaQwenForCausalLM.prepare_inputs_labels_for_multimodal", controller.prepare_multimodal,
          ("self", "input_ids", "position_ids", "attention_mask", "past_key_values", "labels", "images",
           "modalities", "image_sizes")),
    Patch(_LLAVA_QWEN, "LlavaQwenForCausalLM.encode_images", controller.encode_images, ("self", "images")),
    Patch(_LLAVA_QWEN, "LlavaQwenForCausalLM.forward", controller.call_scope,
          _LLAVA_FORWARD + ("modalities", "actions", "dpo_forward", "cache_position")),
    Patch(_LLAVA_QWEN, "LlavaQwenForCausalLM.generate", controller.call_scope,
          ("self", "inputs", "images", "image_sizes", "modalities", "kwargs")),
    Patch("llava.model.builder", "load_pretrained_model", controller.load_pretrained,
          ("model_path", "model_base", "model_name", "load_8bit", "load_4bit", "device_map", "device",
           "use_flash_attn", "kwargs")),
    # training
    Patch(_TRAINER, "LLaVATrainer.__init__", distill.check_depth_at_init,
          ("self", "model", "args", "data_collator", "train_dataset", "eval_dataset", "tokenizer", "model_init",
           "compute_metrics", "callbacks", "optimizers", "preprocess_logits_for_metrics")),
    Patch(_TRAINER, "LLaVATrainer.compute_loss", distill.compute_loss,
          ("self", "model", "inputs", "return_outputs")),
    Patch(_TRAINER, "LLaVATrainer.log", distill.log, ("self", "logs")),
    Patch(_TRAINER, "LLaVATrainer.create_optimizer", trainer_fixes.drop_empty_param_groups, ("self",)),
    Patch(_TRAINER, "LLaVATrainer._load_rng_state", trainer_fixes.load_rng_state, ("self", "checkpoint")),
    Patch("llava.train.train", "TrainingArguments", distill.training_arguments_class,
          ("model_max_length", "mm_projector_lr", "group_by_modality_length", "lora_enable"), replace=True),
    Patch("llava.train.train", "safe_save_model_for_hf_trainer", trainer_fixes.safe_save,
          ("trainer", "output_dir")),
    Patch("transformers.integrations.deepspeed", "HfTrainerDeepSpeedConfig.trainer_config_finalize",
          trainer_fixes.integer_bucket_sizes, ("self", "args", "model", "num_training_steps")),
)

compat.EXPECTED.update((patch.path, patch.params) for patch in PATCHES)

_MISSING = object()
_applied = []  # (owner, attribute name, original attribute or _MISSING), in install order
_installed = False
_registered = set()


def _owner_and_name(module, path: str):
    *owner_path, name = path.split(".")
    owner = module
    for part in owner_path:
        owner = getattr(owner, part)
    return owner, name


def _is_applied(owner, name: str) -> bool:
    return any(o is owner and n == name for o, n, _ in _applied)


def _install(patch: Patch, module) -> None:
    owner, name = _owner_and_name(module, patch.path)
    if _is_applied(owner, name):
        return
    target = getattr(owner, name)
    compat.check_signature(patch.path, target, patch.params, fields=patch.replace)
    original = owner.__dict__.get(name, _MISSING)  # _MISSING: inherited, so removing it restores
    if patch.replace:
        setattr(owner, name, patch.wrapper(target))
    else:
        setattr(owner, name, wrapt.FunctionWrapper(target, patch.wrapper))
    _applied.append((owner, name, original))


def _module_hook(module_name: str):
    def hook(module) -> None:
        if _installed:
            for patch in PATCHES:
                if patch.module == module_name:
                    _install(patch, module)
    return hook


def apply() -> None:
    """Install the hooks (idempotent). Validates the SPARSEVLM_* environment first."""
    global _installed
    if _installed:
        return
    compat.check_versions()
    if env_enabled():
        config_from_env()  # a bad value fails here, at configuration time
    _installed = True
    for module_name in dict.fromkeys(patch.module for patch in PATCHES):
        if module_name in sys.modules:
            _module_hook(module_name)(sys.modules[module_name])
        if module_name not in _registered:
            wrapt.register_post_import_hook(_module_hook(module_name), module_name)
            _registered.add(module_name)


def remove() -> None:
    """Restore upstream's original objects exactly."""
    global _installed
    for owner, name, original in reversed(_applied):
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _applied.clear()
    _installed = False
