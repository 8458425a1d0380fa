"""The inference controller: which path each wrapped upstream call takes.

- LLaVA's `forward` / `generate` open a call scope (see handoff.py).
- `prepare_inputs_labels_for_multimodal` runs upstream's splice and hands the batch layout on.
- `LlamaModel.forward` decodes over a pruned cache, prunes a prefill that carries a layout,
  records a text-only prefill, or runs upstream's code (disabled or unconfigured models,
  models that are not LLaVA, the teacher).
"""
from __future__ import annotations

import inspect
import warnings

import torch

from . import handoff
from .config import config_from_env, env_enabled
from .layout import IGNORE_INDEX, layout_from_probe
from .plan import make_plan, text_only_plan
from .sparse_forward import PrunedCache, prefill_stats, sparse_decode, sparse_prefill
from .state import full_rope, get_state, language_model, state_for

_signatures = {}


def _arguments(wrapped, args, kwargs) -> dict:
    """Upstream's arguments by name (upstream calls some of these functions positionally)."""
    func = getattr(wrapped, "__func__", wrapped)
    signature = _signatures.get(func)
    if signature is None:
        signature = _signatures[func] = inspect.signature(func)
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _flag(a: dict, model, config_name: str, arg_name: str = None):
    value = a[arg_name or config_name]
    return getattr(model.config, config_name) if value is None else value


def _refuse_attentions(a: dict, model) -> None:
    if _flag(a, model, "output_attentions"):
        raise ValueError(
            "output_attentions=True is not supported by the sparse forward (it never builds the "
            "L x L attention matrix): call sparsevlm_patch.disable(model) to get attention maps")


# ----------------------------------------------------------------------------- wrappers

def call_scope(wrapped, instance, args, kwargs):
    """LLaVA's forward / generate: a layout spliced in this call belongs to this call."""
    with handoff.call_scope():
        return wrapped(*args, **kwargs)


def llama_forward(wrapped, instance, args, kwargs):
    """LlamaModel.forward: the sparse paths for enabled LLaVA models, upstream otherwise."""
    state = get_state(instance)
    if state is None and hasattr(instance, "get_vision_tower"):
        # A LLaVA model never configured whose first call skips the multimodal hook (e.g. a
        # text-only `generate`): it runs with the environment's configuration, like the rest.
        state = state_for(instance, auto=True)
    if state is None:
        return wrapped(*args, **kwargs)
    a = _arguments(wrapped, args, kwargs)
    past = a["past_key_values"]
    if isinstance(past, PrunedCache):
        # Decode over a pruned cache stays sparse even if the model was disabled since its
        # prefill: the cache holds a different token set per layer.
        _refuse_attentions(a, instance)
        return sparse_decode(instance, past, input_ids=a["input_ids"], attention_mask=a["attention_mask"],
                             position_ids=a["position_ids"], inputs_embeds=a["inputs_embeds"],
                             output_hidden_states=_flag(a, instance, "output_hidden_states"),
                             return_dict=_flag(a, instance, "use_return_dict", "return_dict"))
    prefill = _cache_length(past) == 0
    layout = handoff.take(instance, a["inputs_embeds"]) if prefill else None
    if not state.enabled:
        return wrapped(*args, **kwargs)
    if not prefill:
        _refuse_rebuilt_pruned_cache(past)
        handoff.discard(instance)
        return wrapped(*args, **kwargs)
    state.clear()
    if layout is None:
        outputs = wrapped(*args, **kwargs)
        _record_text_only(state, instance, a)
        return outputs
    plan = make_plan(state.config, layout)
    if not any(stage.changes for stage in plan.stages):
        # Nothing to prune (a budget at or above the visual count): upstream exactly.
        outputs = wrapped(*args, **kwargs)
        state.record(layout.valid.clone(), prefill_stats(
            plan, [s.image_spans for s in layout.samples], instance.config, len(instance.layers), pruned=False))
        return outputs
    _refuse_attentions(a, instance)
    use_cache = _flag(a, instance, "use_cache")
    if past is not None and use_cache:
        raise ValueError(
            f"past_key_values={type(past).__name__}() given to a sparse prefill: its layers would hold "
            "different tokens, which an upstream cache cannot describe. Pass past_key_values=None: the "
            "prefill returns its own cache (outputs.past_key_values, a PrunedCache), which continues "
            "the generation and can be reused for several continuations")
    if instance.gradient_checkpointing and instance.training:
        use_cache = False
    return sparse_prefill(instance, state, layout, plan, attention_mask=a["attention_mask"],
                          position_ids=a["position_ids"], inputs_embeds=a["inputs_embeds"],
                          use_cache=use_cache,
                          output_hidden_states=_flag(a, instance, "output_hidden_states"),
                          return_dict=_flag(a, instance, "use_return_dict", "return_dict"))


def _refuse_rebuilt_pruned_cache(past) -> None:
    """A pruned cache that lost its per-layer masks (e.g. contrastive search rebuilds legacy
    tuples) cannot be decoded correctly: refuse rather than attend to the wrong tokens."""
    lengths = {layer[0].shape[-2] for layer in past}
    if len(lengths) > 1:
        raise ValueError(
            "this generation mode rebuilt the pruned KV cache (layers of different lengths) and "
            "lost its per-layer masks; it is not supported with pruning: use greedy, sampling or "
            "beam search, or call sparsevlm_patch.disable(model)")


def _cache_length(past) -> int:
    return 0 if past is None or len(past) == 0 else past[0][0].shape[-2]


def _record_text_only(state, model, a: dict) -> None:
    """A prefill without visual tokens keeps every valid token."""
    reference = a["input_ids"] if a["input_ids"] is not None else a["inputs_embeds"][..., 0]
    mask = a["attention_mask"]
    keep = mask.bool() if mask is not None else torch.ones(reference.shape[:2], dtype=torch.bool,
                                                           device=reference.device)
    valid = keep.sum(1).tolist() if mask is not None else [keep.shape[1]] * keep.shape[0]
    plan = text_only_plan(state.config, valid)
    state.record(keep, prefill_stats(plan, [[] for _ in valid], model.config, len(model.layers), pruned=False))


def prepare_multimodal(wrapped, instance, args, kwargs):
    """prepare_inputs_labels_for_multimodal: upstream's splice, plus the batch layout.

    Upstream receives a probe in place of the labels (see layout.py); the real labels are
    rebuilt from the relaid probe, so every output equals upstream's.
    """
    state = state_for(instance, auto=True)
    if state is None or not state.enabled:
        return wrapped(*args, **kwargs)
    a = _arguments(wrapped, args, kwargs)
    input_ids, attention_mask, labels = a["input_ids"], a["attention_mask"], a["labels"]
    if a["images"] is None or input_ids is None or input_ids.shape[1] == 1:
        return wrapped(*args, **kwargs)
    inner = language_model(instance)
    if _cache_length(a["past_key_values"]):
        # Upstream splices images into a continuation over a cache; pruning applies to a
        # prefill only, so that forward runs dense: say so rather than report it as pruned.
        warnings.warn("sparsevlm_patch: images were given together with past_key_values; pruning "
                      "applies to a prefill only, so this forward runs dense (upstream)", stacklevel=3)
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
    handoff.put(inner, layout, embeds)
    return None, position_ids, (None if attention_mask is None else mask_out), past, embeds, labels_out


def rope_forward(wrapped, instance, args, kwargs):
    """RoPE of a sparse model: the whole table (indexed by original position ids)."""
    if not full_rope(instance):
        return wrapped(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    seq_len = args[1] if len(args) > 1 else kwargs.get("seq_len")
    return wrapped(x, seq_len=max(seq_len or 0, instance.max_seq_len_cached))


def load_pretrained(wrapped, instance, args, kwargs):
    """llava.model.builder.load_pretrained_model: the model's depth is known once it is
    loaded, so the environment's pruning layers are checked against it here rather than at
    its first forward. (Not inside the model's __init__: an error there would leave the
    default dtype that transformers' from_pretrained set for loading.)"""
    loaded = wrapped(*args, **kwargs)
    model = loaded[1]
    if env_enabled() and hasattr(model, "get_vision_tower"):
        config_from_env(num_layers=language_model(model).config.num_hidden_layers)
    return loaded
