"""Installing and removing the hooks on the installed transformers and LLaVA.

wrapt post-import hooks patch each target module when it is imported (or at once if it
already is), so `import sparsevlm_patch` may come before or after `import llava`.
`remove()` puts back the exact original function objects.
"""
from __future__ import annotations

import inspect
import sys
import warnings

import torch
import wrapt

from . import compat
from .config import config_from_env, env_enabled
from .layout import IGNORE_INDEX, layout_from_probe
from .plan import make_plan, text_only_plan
from .sparse_forward import PrunedCache, prefill_stats, sparse_decode, sparse_prefill
from .state import FULL_ROPE_ATTR, language_model, state_for

_MISSING = object()
_patches = []  # (owner, name, original attribute or _MISSING)
_installed = False
_registered = False


def _bind(signature, args, kwargs) -> dict:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


# ----------------------------------------------------------------------------- wrappers

def _llama_forward(wrapped, instance, args, kwargs):
    """LlamaModel.forward: the sparse path for enabled LLaVA models, upstream otherwise."""
    state = instance.__dict__.get("_sparsevlm_state")
    if state is None and hasattr(instance, "get_vision_tower"):
        # A LLaVA model never configured whose first call skips the multimodal hook (e.g. a
        # text-only `generate`): it runs with the environment's configuration, like the rest.
        state = state_for(instance, auto=True)
    if state is None:
        return wrapped(*args, **kwargs)
    a = _bind(_LLAMA_SIGNATURE, (None,) + tuple(args), kwargs)
    past = a["past_key_values"]
    if isinstance(past, PrunedCache):
        return sparse_decode(instance, past, input_ids=a["input_ids"], attention_mask=a["attention_mask"],
                             position_ids=a["position_ids"], inputs_embeds=a["inputs_embeds"],
                             output_hidden_states=_flag(a, instance, "output_hidden_states"),
                             return_dict=_flag(a, instance, "use_return_dict", "return_dict"))
    layout, state.pending = state.pending, None
    if not state.enabled:
        return wrapped(*args, **kwargs)
    prefill = past is None or len(past) == 0 or past[0][0].shape[-2] == 0
    if not prefill:
        _refuse_rebuilt_pruned_cache(past)
        return wrapped(*args, **kwargs)
    state.clear()
    layout = _match(layout, a["inputs_embeds"])
    if layout is not None:
        plan = make_plan(state.config, layout)
        if not any(stage.changes for stage in plan.stages):
            # Nothing to prune (a budget at or above the visual count): upstream exactly.
            outputs = wrapped(*args, **kwargs)
            state.record(layout.valid.clone(), prefill_stats(
                plan, [s.image_spans for s in layout.samples], instance.config, len(instance.layers), pruned=False))
            return outputs
        if _flag(a, instance, "output_attentions"):
            raise ValueError(
                "output_attentions=True is not supported by the sparse forward (it never builds the "
                "L x L attention matrix): call sparsevlm_patch.disable(model) to get attention maps")
        use_cache = _flag(a, instance, "use_cache")
        if instance.gradient_checkpointing and instance.training:
            use_cache = False
        return sparse_prefill(instance, state, layout, plan, attention_mask=a["attention_mask"],
                              position_ids=a["position_ids"], inputs_embeds=a["inputs_embeds"],
                              use_cache=use_cache,
                              output_hidden_states=_flag(a, instance, "output_hidden_states"),
                              return_dict=_flag(a, instance, "use_return_dict", "return_dict"))
    outputs = wrapped(*args, **kwargs)
    _record_text_only(state, instance, a)
    return outputs


def _load_pretrained(wrapped, instance, args, kwargs):
    """llava.model.builder.load_pretrained_model: the model's depth is known once it is
    loaded, so the environment's pruning layers are checked against it here rather than at
    its first forward. (Not inside the model's __init__: an error there would leave the
    default dtype that transformers' from_pretrained set for loading.)"""
    loaded = wrapped(*args, **kwargs)
    model = loaded[1]
    if env_enabled() and hasattr(model, "get_vision_tower"):
        config_from_env(num_layers=language_model(model).config.num_hidden_layers)
    return loaded


def _match(layout, embeds):
    """The pending layout if this forward runs on its embeddings, else None.

    Generation with beams or several sequences per prompt repeats each sample's embeddings
    (`repeat_interleave`) between the splice and the prefill: the layout repeats with them.
    """
    if layout is None or embeds is None:
        return None
    if embeds is layout.inputs_embeds:
        return layout
    spliced = layout.inputs_embeds
    copies = embeds.shape[0] // spliced.shape[0]
    if copies > 1 and embeds.shape[0] == copies * spliced.shape[0] and embeds.shape[1:] == spliced.shape[1:]:
        return layout.repeat(copies, embeds)
    warnings.warn("sparsevlm_patch: a multimodal layout was prepared but the next forward ran on other "
                  "embeddings; that forward ran dense (upstream)")
    return None


def _refuse_rebuilt_pruned_cache(past) -> None:
    """A pruned cache that lost its per-layer masks (e.g. contrastive search rebuilds legacy
    tuples) cannot be decoded correctly: refuse rather than attend to the wrong tokens."""
    lengths = {layer[0].shape[-2] for layer in past}
    if len(lengths) > 1:
        raise ValueError(
            "this generation mode rebuilt the pruned KV cache (layers of different lengths) and "
            "lost its per-layer masks; it is not supported with pruning: use greedy, sampling or "
            "beam search, or call sparsevlm_patch.disable(model)")


def _flag(a: dict, model, config_name: str, arg_name: str = None):
    value = a[arg_name or config_name]
    return getattr(model.config, config_name) if value is None else value


def _record_text_only(state, model, a: dict) -> None:
    """A prefill without visual tokens keeps every valid token."""
    reference = a["input_ids"] if a["input_ids"] is not None else a["inputs_embeds"][..., 0]
    mask = a["attention_mask"]
    keep = mask.bool() if mask is not None else torch.ones(reference.shape[:2], dtype=torch.bool,
                                                           device=reference.device)
    valid = keep.sum(1).tolist() if mask is not None else [keep.shape[1]] * keep.shape[0]
    plan = text_only_plan(state.config, valid)
    state.record(keep, prefill_stats(plan, [[] for _ in valid], model.config, len(model.layers), pruned=False))


def _prepare_multimodal(wrapped, instance, args, kwargs):
    """prepare_inputs_labels_for_multimodal: upstream's splice, plus the batch layout.

    Upstream receives a probe in place of the labels (see layout.py); the real labels are
    rebuilt from the relaid probe, so every output equals upstream's.
    """
    state = state_for(instance, auto=True)
    if state is None or not state.enabled:
        return wrapped(*args, **kwargs)
    a = _bind(_PREPARE_SIGNATURE, (None,) + tuple(args), kwargs)
    input_ids, attention_mask, labels = a["input_ids"], a["attention_mask"], a["labels"]
    if a["images"] is None or input_ids is None or input_ids.shape[1] == 1:
        return wrapped(*args, **kwargs)
    B, L = input_ids.shape
    probe = torch.arange(L, device=input_ids.device).expand(B, L).contiguous()
    mask_in = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    _, position_ids, mask_out, past, embeds, probe_out = wrapped(
        input_ids, a["position_ids"], mask_in, a["past_key_values"], probe, a["images"],
        image_sizes=a["image_sizes"])
    if embeds is None:  # upstream returned early (no vision tower): its inputs, unchanged
        return input_ids, a["position_ids"], attention_mask, a["past_key_values"], None, labels
    relaid = lambda values: torch.where(  # noqa: E731  (values moved as upstream moves labels)
        probe_out >= 0, values.gather(1, probe_out.clamp(min=0)), torch.full_like(probe_out, IGNORE_INDEX))
    labels_out = None if labels is None else relaid(labels).to(labels.dtype)
    rater_labels = labels if labels is not None else state.rater_labels
    if rater_labels is not None and rater_labels.shape != input_ids.shape:
        rater_labels = None
    layout = layout_from_probe(probe_out, mask_out.bool(), None if rater_labels is None else relaid(rater_labels))
    layout.inputs_embeds = embeds
    state.pending = layout
    return None, position_ids, (None if attention_mask is None else mask_out), past, embeds, labels_out


def _rope_forward(wrapped, instance, args, kwargs):
    """RoPE of a sparse model: the whole table (indexed by original position ids)."""
    if FULL_ROPE_ATTR not in instance.__dict__:
        return wrapped(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    seq_len = args[1] if len(args) > 1 else kwargs.get("seq_len")
    return wrapped(x, seq_len=max(seq_len or 0, instance.max_seq_len_cached))


# ----------------------------------------------------------------------------- patching

def _wrap(owner, name: str, wrapper) -> None:
    original = owner.__dict__.get(name, _MISSING)
    target = original if original is not _MISSING else getattr(owner, name)
    setattr(owner, name, wrapt.FunctionWrapper(target, wrapper))
    _patches.append((owner, name, original))


def _patch_transformers(module) -> None:
    global _LLAMA_SIGNATURE
    if not _installed or _is_patched(module.LlamaModel, "forward"):
        return
    compat.check_signature("LlamaModel.forward", module.LlamaModel.forward)
    compat.check_signature("LlamaRotaryEmbedding.forward", module.LlamaRotaryEmbedding.forward)
    _LLAMA_SIGNATURE = inspect.signature(module.LlamaModel.forward)
    _wrap(module.LlamaModel, "forward", _llama_forward)
    _wrap(module.LlamaRotaryEmbedding, "forward", _rope_forward)


def _patch_llava(module) -> None:
    global _PREPARE_SIGNATURE
    owner = module.LlavaMetaForCausalLM
    if not _installed or _is_patched(owner, "prepare_inputs_labels_for_multimodal"):
        return
    name = "LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal"
    compat.check_signature(name, owner.prepare_inputs_labels_for_multimodal)
    _PREPARE_SIGNATURE = inspect.signature(owner.prepare_inputs_labels_for_multimodal)
    _wrap(owner, "prepare_inputs_labels_for_multimodal", _prepare_multimodal)


def _patch_builder(module) -> None:
    if not _installed or _is_patched(module, "load_pretrained_model"):
        return
    _wrap(module, "load_pretrained_model", _load_pretrained)


def _patch_trainer(module) -> None:
    from . import distill, train

    owner = module.LLaVATrainer
    if not _installed or _is_patched(owner, "compute_loss"):
        return
    _wrap(owner, "__init__", distill.check_depth_at_init)
    _wrap(owner, "create_optimizer", train.drop_empty_param_groups)
    _wrap(owner, "compute_loss", distill.compute_loss)
    _wrap(owner, "log", distill.log)


def _patch_train_module(module) -> None:
    """llava.train.train: the sparse flags in upstream's parser, and a CPU-safe save."""
    from . import train

    if not _installed or _is_patched(module, "TrainingArguments"):
        return
    _patches.append((module, "TrainingArguments", module.__dict__["TrainingArguments"]))
    module.TrainingArguments = train.training_arguments_class(module.TrainingArguments)
    _wrap(module, "safe_save_model_for_hf_trainer", train.safe_save)
    train.allow_numpy_rng_state()


def _patch_hf_deepspeed(module) -> None:
    from . import train

    owner = module.HfTrainerDeepSpeedConfig
    if not _installed or _is_patched(owner, "trainer_config_finalize"):
        return
    _wrap(owner, "trainer_config_finalize", train.integer_bucket_sizes)


_HOOKS = {
    "transformers.models.llama.modeling_llama": _patch_transformers,
    "llava.model.llava_arch": _patch_llava,
    "llava.model.builder": _patch_builder,
    "llava.train.llava_trainer": _patch_trainer,
    "llava.train.train": _patch_train_module,
    "transformers.integrations.deepspeed": _patch_hf_deepspeed,
}


def _is_patched(owner, name: str) -> bool:
    return any(o is owner and n == name for o, n, _ in _patches)


def apply() -> None:
    """Install the hooks (idempotent). Validates the SPARSEVLM_* environment first."""
    global _installed, _registered
    if _installed:
        return
    compat.check_versions()
    if env_enabled():
        config_from_env()  # a bad value fails here, at configuration time
    _installed = True
    if not _registered:
        for module_name, hook in _HOOKS.items():
            wrapt.register_post_import_hook(hook, module_name)
        _registered = True
    else:
        for module_name, hook in _HOOKS.items():
            if module_name in sys.modules:
                hook(sys.modules[module_name])


def remove() -> None:
    """Restore upstream's original functions exactly."""
    global _installed
    for owner, name, original in reversed(_patches):
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _patches.clear()
    _installed = False
