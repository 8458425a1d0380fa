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

from . import fastpath, handoff
from .config import config_from_env, env_enabled
from .families import check_prunable
from .layout import IGNORE_INDEX, layout_from_probe
from .plan import make_plan, text_only_plan
from .layout import to_device
from .sparse_forward import (PrefillInputs, PrunedCache, ensure_rope, model_outputs, prefill_inputs, prefill_stats,
                             run_prefill, sliding_window, sparse_decode, sparse_prefill, stage_shapes)
from .state import full_rope, get_state, language_model, state_for

_signatures = {}


def _arguments(wrapped, args, kwargs) -> dict:
    """Upstream's arguments by name (upstream calls some of these functions positionally)."""
    return _bound(wrapped, args, kwargs).arguments


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
    """LLaVA's forward / generate: a layout spliced in this call belongs to this call; a
    generate() call also says what it will decode (for the fast path)."""
    generation = _generation(instance, kwargs) if wrapped.__name__ == "generate" else None
    with handoff.call_scope(generation):
        return wrapped(*args, **kwargs)


def _generation(model, kwargs) -> dict:
    """What this generate() call asks for: the new-token budget, and why (if so) its decode
    can't run over a static cache."""
    config = kwargs.get("generation_config") or model.generation_config
    get = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731
    reason = None
    if (get("num_beams") or 1) > 1:
        reason = "beam search reorders the cache"
    elif get("penalty_alpha") or kwargs.get("assistant_model") is not None or get("prompt_lookup_num_tokens"):
        reason = "contrastive, assisted or prompt-lookup generation"
    elif get("output_attentions") or get("output_hidden_states"):
        reason = "generation with output_attentions or output_hidden_states"
    new_tokens = get("max_new_tokens") or get("max_length") or 20
    return {"new_tokens": new_tokens, "dynamic_reason": reason}


def lm_forward(wrapped, instance, args, kwargs):
    """The language model's forward (LlamaModel, MistralModel): the sparse paths for enabled
    LLaVA models, upstream otherwise."""
    state = get_state(instance)
    if state is None and hasattr(instance, "get_vision_tower"):
        # A LLaVA model never configured whose first call skips the multimodal hook (e.g. a
        # text-only `generate`): it runs with the environment's configuration, like the rest.
        state = state_for(instance, auto=True)
    if state is None:
        return wrapped(*args, **kwargs)
    a = _arguments(wrapped, args, kwargs)
    past = a["past_key_values"]
    if isinstance(past, fastpath.StaticPrunedCache):
        _refuse_attentions(a, instance)
        return _fast_decode(instance, state, past, a)
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
    use_cache = _flag(a, instance, "use_cache")
    if state.config.cuda_graphs:
        # Also with nothing to prune: the fast path is then dense upstream layers, captured.
        reason = _fast_prefill_refusal(instance, state, a, use_cache)
        if reason is None:
            return _fast_prefill(instance, state, layout, plan, a, use_cache)
        fastpath.fallback(reason)
    if not any(stage.changes for stage in plan.stages):
        # Nothing to prune (a budget at or above the visual count): upstream exactly.
        outputs = wrapped(*args, **kwargs)
        state.record(layout.valid.clone(), prefill_stats(
            plan, [s.image_spans for s in layout.samples], instance.config, len(instance.layers), pruned=False))
        return outputs
    _refuse_attentions(a, instance)
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


# ----------------------------------------------------------------------------- fast path

def _fast_state(state) -> "fastpath.FastState":
    if state.fast is None:
        state.fast = fastpath.FastState()
    return state.fast


def _fast_prefill_refusal(model, state, a: dict, use_cache: bool):
    """Why this prefill can't take the fast path (None: it can)."""
    reason = fastpath.refusal(model, _fast_state(state))
    if reason:
        return reason
    if model.training or torch.is_grad_enabled():
        return "training, or gradients enabled (the fast path is for inference under torch.no_grad)"
    if _flag(a, model, "output_hidden_states") or _flag(a, model, "output_attentions"):
        return "output_hidden_states or output_attentions"
    if a["past_key_values"] is not None and use_cache:
        return "a cache object passed in to the prefill"
    if fastpath.bucket(a["inputs_embeds"].shape[1], fastpath.LENGTH_BUCKET) > fastpath.MAX_LENGTH:
        return f"a prompt longer than the largest bucket ({fastpath.MAX_LENGTH} tokens)"
    return None


def _fast_prefill(model, state, layout, plan, a: dict, use_cache: bool):
    """A sparse prefill padded to its buckets, replayed as a CUDA graph where capture serves
    (the same fixed-shape code eagerly elsewhere). Inside a generate() call its cache goes to
    static buffers that the fast decode writes in place."""
    fast = _fast_state(state)
    embeds = a["inputs_embeds"]
    B, L, _ = embeds.shape
    capture = fastpath.can_capture(embeds.device)
    if not capture:
        fastpath.note_once(f"capture needs a CUDA device (this model is on {embeds.device.type}): the fixed-shape "
                           "fast path runs without graphs")
    length = fastpath.bucket(L, fastpath.LENGTH_BUCKET)
    raters = fastpath.bucket(max(s.question_span[1] - s.question_span[0] for s in layout.samples),
                             fastpath.RATER_BUCKET)
    scope = handoff.generation_scope()
    new_tokens = fastpath.bucket(scope.generation["new_tokens"], fastpath.NEW_TOKENS_BUCKET) if scope else 0
    ensure_rope(model.layers, embeds, length + new_tokens)
    fast.track(model)
    inp = prefill_inputs(layout, plan, embeds, a["position_ids"], length=length, raters=raters)
    shapes = stage_shapes(plan, length=length)
    config = state.config
    # The bucket's pads follow every sample's slots, so a causal pass serves where the batch's own do.
    key = ("prefill", B, length, raters, tuple(plan.visual_counts), embeds.dtype, use_cache, layout.causal)
    run = fastpath.runner(fast, key, lambda **t: run_prefill(
        model, PrefillInputs(**t), shapes, config.selection, config.seed, all_valid=False, causal=layout.causal,
        use_cache=use_cache)[:3])
    with fast.lock:  # the graph's outputs are copied out before another replay
        last, keep, cache = run(capture, **inp.tensors())
        fast.last_path = "captured" if capture and run.graph is not None else "fixed-shape, eager"
        last, keep = last[:, :L].clone(), keep[:, :L].clone()
        if cache is not None:
            cache = _static_cache(fast, cache, L) or _owned_cache(cache, L)
    stats = prefill_stats(plan, [s.image_spans for s in layout.samples], model.config, len(model.layers),
                          pruned=any(stage.changes for stage in plan.stages))
    stats["fast_path"] = fast.report()
    state.record(keep, stats)
    return model_outputs(last, cache, None, _flag(a, model, "use_return_dict", "return_dict"))


def _static_cache(fast, cache, prompt_length: int):
    """The static cache of this generate() call, loaded with the prefill's cache, or None."""
    scope = handoff.generation_scope()
    if scope is None:
        return None
    if scope.generation["dynamic_reason"]:
        fastpath.fallback(scope.generation["dynamic_reason"] + ": decode runs on the dynamic path")
        return None
    new_tokens = fastpath.bucket(scope.generation["new_tokens"], fastpath.NEW_TOKENS_BUCKET)
    if cache.stage_valid[0].shape[1] + new_tokens > fastpath.MAX_LENGTH:
        fastpath.fallback(f"prompt and new tokens past the largest bucket ({fastpath.MAX_LENGTH})")
        return None
    buffers = fastpath.decode_buffers(fast, cache, new_tokens)
    if buffers is None:
        fastpath.fallback("another generation in flight holds the static cache of this shape")
        return None
    buffers.load(cache)
    static = fastpath.StaticPrunedCache(buffers, prompt_length)

    def release():
        static.expired = True
        buffers.in_use = False

    scope.on_exit.append(release)
    return static


def _owned_cache(cache, length: int) -> PrunedCache:
    """A PrunedCache of the graph's output that later replays can't change, its first stage
    trimmed to the prompt's own length (generation reads the past length from layer 0)."""
    owned = PrunedCache()
    for i, s in enumerate(cache.layer_stage):
        trim = length if s == 0 else None
        owned.key_cache.append(cache.key_cache[i][:, :, :trim].clone())
        owned.value_cache.append(cache.value_cache[i][:, :, :trim].clone())
    owned.seen_tokens = length
    owned.stage_valid = [v[:, :length].clone() if s == 0 else v.clone() for s, v in enumerate(cache.stage_valid)]
    owned.stage_all_valid = [False] * len(cache.stage_valid)
    owned.stage_pos = [p[:, :length].clone() if s == 0 else p.clone() for s, p in enumerate(cache.stage_pos)]
    owned.layer_stage = list(cache.layer_stage)
    return owned


def _fast_decode(model, state, cache, a: dict):
    """One decode step over a static pruned cache (a captured graph where capture serves)."""
    cache.check()
    embeds = a["inputs_embeds"] if a["inputs_embeds"] is not None else model.embed_tokens(a["input_ids"])
    B, s, _ = embeds.shape
    if s != 1:
        raise ValueError(f"a fast-path (cuda_graphs) cache continues one token per step, got {s}: continue with "
                         "cuda_graphs off for longer continuations")
    mask = a["attention_mask"]
    step = (mask.shape[1] if mask is not None else cache.length + 1) - 1 - cache.prompt_length
    buffers = cache.buffers
    if not 0 <= step < buffers.new_tokens:
        raise ValueError(f"decode step {step} is past the {buffers.new_tokens} new tokens this generation's "
                         "static cache was made for")
    position_ids = a["position_ids"]
    if position_ids is None:
        position_ids = torch.full((B, 1), cache.prompt_length + step, dtype=torch.long, device=embeds.device)
    new_valid = mask[:, -1:].bool() if mask is not None else torch.ones(B, 1, dtype=torch.bool, device=embeds.device)
    capture = fastpath.can_capture(embeds.device)
    fast = _fast_state(state)
    if getattr(buffers, "runner", None) is None:
        view = fastpath.StaticPrunedCache(buffers, 0)
        window = sliding_window(model, buffers.valid[0].shape[1])
        buffers.runner = fastpath.Runner(lambda **t: fastpath.decode_step(model, view, window=window, **t), fast)
    with fast.lock:
        hidden = buffers.runner(capture, embeds=embeds, position_ids=position_ids, new_valid=new_valid,
                                step=to_device(torch.tensor([step]), embeds.device)).clone()
    cache.length = cache.prompt_length + step + 1
    return model_outputs(hidden, cache, None, _flag(a, model, "use_return_dict", "return_dict"))


def encode_images(wrapped, instance, args, kwargs):
    """LlavaMetaForCausalLM.encode_images: the vision tower and projector, replayed as one
    CUDA graph per batch shape on the fast path."""
    state = get_state(instance)
    images = args[0] if args else kwargs["images"]
    if (state is None or not state.enabled or state.config is None or not state.config.cuda_graphs
            or not torch.is_tensor(images) or not fastpath.can_capture(images.device)):
        return wrapped(*args, **kwargs)
    fast = _fast_state(state)
    weights = next(instance.get_model().get_vision_tower().parameters())
    key = ("vision", tuple(images.shape), images.dtype, weights.data_ptr(), weights.dtype)
    with fast.lock:
        return fastpath.runner(fast, key, lambda images: wrapped(images))(True, images=images).clone()


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


def _bound(wrapped, args, kwargs) -> inspect.BoundArguments:
    """Upstream's arguments bound to its own signature (`self` bound to None), defaults applied."""
    func = getattr(wrapped, "__func__", wrapped)
    signature = _signatures.get(func)
    if signature is None:
        signature = _signatures[func] = inspect.signature(func)
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound


def prepare_multimodal(wrapped, instance, args, kwargs):
    """prepare_inputs_labels_for_multimodal: upstream's splice, plus the batch layout.

    Upstream receives a probe in place of the labels (see layout.py); the real labels are
    rebuilt from the relaid probe, so every output equals upstream's. Every other argument
    goes through as given (LLaVA-NeXT's `modalities` too), and upstream's tuple comes back
    whatever its length (LLaVA's 6 values, LLaVA-NeXT's 7 with `action_idx`), with only the
    input ids (None), the attention mask (None if none was given) and the labels replaced.
    """
    state = state_for(instance, auto=True)
    if state is None or not state.enabled:
        return wrapped(*args, **kwargs)
    # A model loaded without upstream's loader gets the environment's state here: one whose
    # language model the plugin can't prune must not run dense in silence.
    check_prunable(instance, "SPARSEVLM=1 (the environment)", "set SPARSEVLM=0 to run it as upstream")
    bound = _bound(wrapped, args, kwargs)
    a = bound.arguments
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
    a["labels"] = torch.arange(L, device=input_ids.device).expand(B, L).contiguous()  # the probe
    if attention_mask is None:
        a["attention_mask"] = torch.ones_like(input_ids, dtype=torch.bool)
    out = tuple(wrapped(*bound.args[1:], **bound.kwargs))
    _, position_ids, mask_out, past, embeds, probe_out = out[:6]
    if embeds is None:  # upstream returned early (no vision tower): its inputs, unchanged
        return (out[0], out[1], attention_mask, out[3], None, labels) + out[6:]
    relaid = lambda values: torch.where(  # noqa: E731  (values moved as upstream moves labels)
        probe_out >= 0, values.gather(1, probe_out.clamp(min=0)), torch.full_like(probe_out, IGNORE_INDEX))
    labels_out = None if labels is None else relaid(labels).to(labels.dtype)
    rater_labels = labels if labels is not None else state.rater_labels
    if rater_labels is not None and rater_labels.shape != input_ids.shape:
        rater_labels = None
    layout = layout_from_probe(probe_out, mask_out.bool(), None if rater_labels is None else relaid(rater_labels))
    handoff.put(inner, layout, embeds)
    return (None, position_ids, (None if attention_mask is None else mask_out), past, embeds, labels_out) + out[6:]


def rope_forward(wrapped, instance, args, kwargs):
    """RoPE of a sparse model: the whole table (indexed by original position ids)."""
    if not full_rope(instance):
        return wrapped(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    seq_len = args[1] if len(args) > 1 else kwargs.get("seq_len")
    return wrapped(x, seq_len=max(seq_len or 0, instance.max_seq_len_cached))


def load_pretrained(wrapped, instance, args, kwargs):
    """llava.model.builder.load_pretrained_model: the model's class and depth are known once
    it is loaded, so its language model and the environment's pruning layers are checked
    here rather than at its first forward. (Not inside the model's __init__: an error there
    would leave the default dtype that transformers' from_pretrained set for loading.)"""
    loaded = wrapped(*args, **kwargs)
    model = loaded[1]
    if env_enabled() and hasattr(model, "get_vision_tower"):
        # A LLaVA whose LM the plugin cannot prune would run dense under SPARSEVLM=1: refuse it.
        check_prunable(model, "SPARSEVLM=1 (llava.model.builder.load_pretrained_model)",
                       "SPARSEVLM=0 in the environment runs it as upstream.")
        config_from_env(num_layers=language_model(model).config.num_hidden_layers)
    return loaded
