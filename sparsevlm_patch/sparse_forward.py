"""The sparse `LlamaModel` forward: prefill with pruning, and decode over a pruned cache.

The decoder layers are upstream's own modules, called on a compact batch of the tokens
still active (padded per sample, pads masked). At each pruning layer, before the layer
runs, its raters' queries and all keys rate the visual tokens; the top-k (plus recycled
merges) stay. Outputs are scattered back to the original L positions, so the LM head,
labels and the generation loop never see a shorter sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from .fastpath import decode_attention_backends
from .layout import BatchLayout, to_device
from .plan import PrefillPlan, flops_summary
from .state import mark_full_rope
from .selection import (gather_rows, head_count_v2, random_scores, rater_attention, rater_weights, recycle,
                        rope_only_logits, select_raters, top_k_mask, v2_scores, visual_scores)


class PrunedCache(DynamicCache):
    """A DynamicCache whose layers hold different token sets after a sparse prefill.

    `stage_valid[s]` marks the real (non-pad) slots of the layers of stage s;
    `layer_stage[i]` is the stage of layer i. Layer 0 always holds the whole prompt, so
    upstream's generation loop reads the right past length from it.

    Like upstream's legacy tuples, a PrunedCache is never changed by a later call: each decode
    step extends a copy and returns it, so one prefill's cache can serve several
    continuations. Only the plugin's sparse forward can read it (its layers need per-layer
    masks): upstream's forward, e.g. after `sparsevlm_patch.remove()` in the middle of a
    generation, gets a clear error instead of wrong attention.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stage_valid: List[torch.Tensor] = []
        self.stage_all_valid: List[bool] = []  # host: the stage's slots hold no pads
        self.stage_pos: List[torch.Tensor] = []  # position ids of the stage's slots
        self.layer_stage: List[int] = []
        self.in_sparse_forward = False

    def branch(self) -> "PrunedCache":
        """A copy to extend (the tensors are shared; extending one replaces them in the copy)."""
        new = PrunedCache()
        new.key_cache, new.value_cache = list(self.key_cache), list(self.value_cache)
        new.seen_tokens = self.seen_tokens
        new.stage_valid, new.stage_all_valid = list(self.stage_valid), list(self.stage_all_valid)
        new.stage_pos = list(self.stage_pos)
        new.layer_stage = list(self.layer_stage)
        return new

    def get_usable_length(self, new_seq_length: int, layer_idx: Optional[int] = 0) -> int:
        if not self.in_sparse_forward:
            raise RuntimeError(
                "this KV cache was pruned by sparsevlm_patch (its layers hold different tokens) and only "
                "the plugin's decode can continue it, but the language model ran upstream's forward: "
                "sparsevlm_patch.remove() was probably called during this generation. Call "
                "sparsevlm_patch.apply() to finish it, or start a new generation (which runs dense)")
        return super().get_usable_length(new_seq_length, layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.stage_valid = [v.index_select(0, beam_idx.to(v.device)) for v in self.stage_valid]
        self.stage_pos = [p.index_select(0, beam_idx.to(p.device)) for p in self.stage_pos]


@dataclass
class Active:
    """The compact batch of active tokens: slot s of sample b is original position
    orig[b, s] (L for recycled tokens and pads)."""

    hidden: torch.Tensor  # [B, N, D]
    orig: torch.Tensor  # [B, N]
    pos: torch.Tensor  # [B, N] position ids
    valid: torch.Tensor  # [B, N]
    visual: torch.Tensor  # [B, N] visual pool (original or recycled visual tokens)
    rater_slot: torch.Tensor  # [B, R]
    all_valid: bool  # host: no pads in this batch


def attention_mask_for(valid: torch.Tensor, unmasked: bool, dtype, impl: str, queries: int = None,
                       pos: torch.Tensor = None, window: int = None):
    """The mask upstream's attention modules expect, for a causal pass over `valid` slots.

    `queries`: number of trailing slots that are queries (decode); None = all (prefill).
    `unmasked`: the pass needs no mask beyond causality. In a prefill that holds when every
    sample's valid slots are a prefix (pad rows at the end are computed but never read); in
    a decode only when nothing is padded. SDPA and flash then take None (their causal
    kernels); otherwise flash takes the 2-D mask, and eager and SDPA the additive 4-D mask
    (B, 1, q, kv). Pad query rows see themselves so that no row is fully masked. `window`
    (with the slots' positions `pos`): a query sees only keys less than `window` positions
    back (Mistral's sliding window).
    """
    if unmasked and window is None and impl in ("sdpa", "flash_attention_2"):
        return None
    if impl == "flash_attention_2":
        return valid.long()
    kv = valid.shape[1]
    q = kv if queries is None else queries
    k_idx = torch.arange(kv, device=valid.device)
    q_idx = k_idx[kv - q:]
    allowed = valid[:, None, :] & (k_idx[None, None, :] <= q_idx[None, :, None])
    if window is not None:
        allowed = allowed & (pos[:, kv - q:, None] - pos[:, None, :] < window)
    allowed = allowed | (k_idx[None, None, :] == q_idx[None, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def sliding_window(model, length: int):
    """The sliding window upstream applies to `model`'s attention, None if none. In
    transformers 4.37 Mistral and Qwen2 apply it in eager attention (Qwen2 even with
    `use_sliding_window=False`); their SDPA paths ignore it.
    Flash attention applies it by slot and slices the cache by slot, which compact batches
    and pruned caches break: refused once a sequence reaches the window."""
    window = getattr(model.config, "sliding_window", None)
    impl = getattr(model.config, "_attn_implementation", "eager")
    if window is None or impl == "sdpa":
        return None
    if impl == "flash_attention_2":
        if not getattr(model.config, "use_sliding_window", True):
            return None  # Qwen2's flash attention applies the window only when asked to
        if length >= window:
            raise ValueError(
                f"{type(model).__name__} with flash_attention_2 and sliding_window={window} on a sequence of "
                f"{length} tokens: flash attention applies the window by cache slot, which a pruned cache "
                "breaks. Load the model with attn_implementation='eager' (which applies the window as "
                "upstream does) or 'sdpa' (upstream's SDPA ignores it), or call sparsevlm_patch.disable(model)")
        return None
    return window


def ensure_rope(layers, x: torch.Tensor, length: int) -> None:
    """Grow each layer's RoPE table to `length` (upstream's own cache growth)."""
    for layer in layers:
        rotary = layer.self_attn.rotary_emb
        if length > rotary.max_seq_len_cached:
            rotary(x, seq_len=length)


def _run_layer(model, layer, hidden, mask, pos, cache, use_cache):
    if model.gradient_checkpointing and model.training:
        out = model._gradient_checkpointing_func(layer.__call__, hidden, mask, pos, cache, False, use_cache)
    else:
        out = layer(hidden, attention_mask=mask, position_ids=pos, past_key_value=cache,
                    output_attentions=False, use_cache=use_cache)
    return out[0]


def _rotate(x: torch.Tensor, cos, sin, pos: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, S, heads, d] in its contiguous layout (upstream's rotation, applied once)."""
    return x * cos[pos].unsqueeze(2) + rotate_half(x) * sin[pos].unsqueeze(2)


@dataclass
class Rating:
    """What the selection rule needs at every pruning layer, made once per forward."""

    rule: str
    rater_weight: torch.Tensor  # [B, R]: 1 / (raters x heads) on raters (sparsevlm, fastv)
    raters: torch.Tensor  # bool [B, R]
    visual_rank: torch.Tensor = None  # [B, L + 1]: rank among the sample's visual tokens (random)
    seed: int = 0
    window: int = None  # the model's sliding window, where upstream applies one


@torch.no_grad()
def _scores(layer, act: Active, rater_weight: torch.Tensor, rope_len: int, window: int = None) -> torch.Tensor:
    """Rater -> visual attention of `layer` over the active tokens, from queries and keys
    (the sparsevlm and fastv rules: averaged over heads and raters)."""
    probs, _, _ = _rater_probs(layer, act, rope_len, window)
    return visual_scores(probs, rater_weight, act.visual)


def _rater_probs(layer, act: Active, rope_len: int, window: int = None):
    """Eager attention's probabilities of the rater rows of `layer` [B, H, R, N], and the
    layer's RoPE tables."""
    attn = layer.self_attn
    B, N, _ = act.hidden.shape
    x = layer.input_layernorm(act.hidden)
    R = act.rater_slot.shape[1]
    key = attn.k_proj(x).view(B, N, attn.num_key_value_heads, attn.head_dim)
    query = attn.q_proj(gather_rows(x, act.rater_slot)).view(B, R, attn.num_heads, attn.head_dim)
    cos, sin = attn.rotary_emb(key, seq_len=rope_len)
    rater_pos = act.pos.gather(1, act.rater_slot)
    if attn.num_heads == attn.num_key_value_heads:  # one rotation for keys and queries
        both = _rotate(torch.cat([key, query], 1), cos, sin, torch.cat([act.pos, rater_pos], 1))
        key, query = both[:, :N], both[:, N:]
    else:
        key, query = _rotate(key, cos, sin, act.pos), _rotate(query, cos, sin, rater_pos)
    key = repeat_kv(key.transpose(1, 2), attn.num_key_value_groups)
    in_window = {} if window is None else {"in_window": rater_pos[:, :, None] - act.pos[:, None, :] < window}
    return rater_attention(query.transpose(1, 2), key, act.rater_slot, act.valid, **in_window), cos, sin


@torch.no_grad()
def _rule_scores(layer, act: Active, rating: Rating, rope_len: int, stage_index: int) -> torch.Tensor:
    if rating.rule == "random":
        return random_scores(rating.visual_rank.gather(1, act.orig), act.visual, rating.seed, stage_index)
    if rating.rule == "sparsevlm_v2":
        probs, cos, sin = _rater_probs(layer, act, rope_len, rating.window)
        gravity = rope_only_logits(cos, sin, act.pos.gather(1, act.rater_slot), act.pos)
        return v2_scores(probs, gravity, rating.raters, act.visual, head_count_v2(layer.self_attn.num_heads))
    return _scores(layer, act, rating.rater_weight, rope_len, rating.window)


@dataclass
class StageShape:
    """Host-side sizes of one pruning stage: maxima over the batch (fixed per bucket when the
    prefill is captured)."""

    layer: int
    changes: bool
    kept: int
    candidates: int
    recycled: int
    width: int  # active slots from this stage on
    all_valid: bool  # no pads among them


@dataclass
class PrefillInputs:
    """Everything a prefill's layers read, as device tensors (a captured prefill's static
    buffers): the batch's embeddings and positions, its layout and its plan's counts."""

    embeds: torch.Tensor  # [B, L, D]
    pos: torch.Tensor  # [B, L]
    valid: torch.Tensor  # bool [B, L]
    visual: torch.Tensor  # bool [B, L]
    cand_idx: torch.Tensor  # [B, R]: rater candidates (the question's slots)
    cand_ok: torch.Tensor
    vis_idx: torch.Tensor  # [B, V]: visual slots
    vis_ok: torch.Tensor
    counts: torch.Tensor  # [stages, 4, B]: kept / candidates / recycled / tokens
    fallback: torch.Tensor  # bool [B]: no prompt text, the last visual token rates

    def tensors(self) -> dict:
        return dict(self.__dict__)


def stage_shapes(plan: PrefillPlan, length: int = None) -> List[StageShape]:
    """Sizes of each stage; with `length` (a bucket past the batch's own length) the widths
    hold every sample padded to `length`, so that they depend only on the bucket and the
    samples' visual counts."""
    shapes = []
    for stage in plan.stages:
        if length is None:
            width, all_valid = max(stage.tokens), len(set(stage.tokens)) == 1
        else:
            removed = [v - t for v, t in zip(plan.valid_counts, stage.tokens)]
            width, all_valid = length - min(removed), False
        shapes.append(StageShape(stage.layer, stage.changes, max(stage.kept), max(stage.candidates),
                                 max(stage.recycled), width, all_valid))
    return shapes


def prefill_inputs(layout: BatchLayout, plan: PrefillPlan, inputs_embeds, position_ids,
                   length: int = None, raters: int = None) -> PrefillInputs:
    """The device inputs of a prefill; with `length` / `raters`, padded to those sizes (pad
    slots are invalid, pad rater slots unused)."""
    B, L, D = inputs_embeds.shape
    device = inputs_embeds.device
    length = length or L
    if position_ids is None:
        position_ids = torch.arange(L, device=device)[None]
    pos = position_ids.expand(B, L)
    cand_idx, cand_ok = layout.padded_index("question", device, width=raters)
    vis_idx, vis_ok = layout.padded_index("visual", device)
    counts = torch.tensor([[s.kept, s.candidates, s.recycled, s.tokens] for s in plan.stages], dtype=torch.long)
    fallback = torch.tensor([s.rater_fallback for s in layout.samples])
    extra = length - L
    pad = (lambda t, value=0: t if extra == 0 else  # noqa: E731
           torch.cat([t, t.new_full((B, extra) + t.shape[2:], value)], 1))
    return PrefillInputs(
        embeds=pad(inputs_embeds), pos=pad(pos), valid=pad(layout.valid, False), visual=pad(layout.visual, False),
        cand_idx=cand_idx, cand_ok=cand_ok, vis_idx=vis_idx, vis_ok=vis_ok,
        counts=to_device(counts.reshape(len(plan.stages), 4, B), device), fallback=to_device(fallback, device))


def _prune(layer, act: Active, shape: StageShape, counts, rating: Rating, fallback, rope_len, length,
           stage_index: int) -> Active:
    """Score, select, recycle and compact before `layer`. `counts`: device [4, B] copy of the
    stage's kept / candidates / recycled / tokens (copied before the layers run);
    `fallback`: device [B] bool."""
    device = act.hidden.device
    kept_n, cand_n, rec_n, tokens_n = counts
    B, N, D = act.hidden.shape
    slots = torch.arange(N, device=device)
    last_pool = (act.visual * slots).amax(dim=1)
    # Samples without prompt text are rated by their last visual token, wherever it is now.
    rater_slot = act.rater_slot.clone()
    rater_slot[:, 0] = torch.where(fallback, last_pool, rater_slot[:, 0])
    act.rater_slot = rater_slot

    scores = _rule_scores(layer, act, rating, rope_len, stage_index)
    kept = top_k_mask(scores, kept_n, shape.kept)

    max_rec = shape.recycled
    recycled = recycle(act.hidden, scores, act.visual & ~kept, cand_n, rec_n, shape.candidates, max_rec)
    rec_ok = torch.arange(max_rec, device=device)[None] < rec_n[:, None]

    # New order: surviving slots in their order, recycled tokens right after the last
    # visual slot of the pool; everything dropped sorts to the end.
    survive = act.valid & (~act.visual | kept)
    big = 4 * (N + max_rec) + 4
    key_old = torch.where(survive, 2 * slots, big + slots)
    key_rec = torch.where(rec_ok, 2 * last_pool[:, None] + 1,
                          big + N + torch.arange(max_rec, device=device)[None])
    width = shape.width
    order = torch.argsort(torch.cat([key_old, key_rec], 1), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=device)[None] < tokens_n[:, None]

    last_pos = act.pos.gather(1, last_pool[:, None])
    orig = torch.cat([act.orig, torch.full((B, max_rec), length, device=device)], 1).gather(1, order)
    inverse = torch.zeros(B, N + max_rec, dtype=torch.long, device=device)
    inverse.scatter_(1, order, torch.arange(width, device=device).expand(B, -1).contiguous())
    return Active(
        hidden=gather_rows(torch.cat([act.hidden, recycled], 1), order),
        orig=torch.where(valid, orig, length),
        pos=torch.cat([act.pos, last_pos.expand(B, max_rec)], 1).gather(1, order),
        valid=valid,
        visual=torch.cat([kept, rec_ok], 1).gather(1, order) & valid,
        rater_slot=inverse.gather(1, act.rater_slot),
        all_valid=shape.all_valid,
    )


def _rating(rule: str, inp: PrefillInputs, heads: int, seed: int):
    """The rule's rating and rater slots for this batch. sparsevlm and sparsevlm_v2 choose
    raters among the question's tokens from the LLM-input embeddings; fastv rates with the
    last prompt token alone; random needs no rater."""
    cand_idx, cand_ok = inp.cand_idx, inp.cand_ok
    if rule == "fastv":
        last = (cand_ok.sum(1, keepdim=True) - 1).clamp(min=0)
        cand_idx, cand_ok = cand_idx.gather(1, last), cand_ok.any(1, keepdim=True)
        raters = cand_ok
    elif rule == "random":
        raters = cand_ok
    else:
        raters = select_raters(gather_rows(inp.embeds, inp.vis_idx), inp.vis_ok,
                               gather_rows(inp.embeds, cand_idx), cand_ok)
    rank = None
    if rule == "random":
        rank = torch.cumsum(inp.visual.long(), 1) - 1
        rank = torch.cat([rank, torch.zeros_like(rank[:, :1])], 1)  # recycled tokens and pads: column L
    return Rating(rule, rater_weights(raters, heads), raters, rank, seed), cand_idx


def _scatter(full: torch.Tensor, act: Active) -> torch.Tensor:
    index = act.orig[..., None].expand(-1, -1, full.shape[-1])
    return full.scatter(1, index, act.hidden)


def run_prefill(model, inp: PrefillInputs, shapes: List[StageShape], rule: str, seed: int, *, all_valid: bool,
                causal: bool, use_cache: bool, output_hidden_states: bool = False):
    """The layers of a sparse prefill on device inputs alone (no host round-trip: this is what
    a CUDA graph captures). `all_valid`: no pads in `inp` (what the cache records for decode);
    `causal`: every sample's valid slots in `inp` are a prefix (see BatchLayout.causal), which
    no pads implies. Returns (normed last hidden states [B, L, D], keep mask [B, L], PrunedCache
    or None, per-layer hidden states or None)."""
    layers = model.layers
    B, L, D = inp.embeds.shape
    device = inp.embeds.device
    impl = getattr(model.config, "_attn_implementation", "eager")
    rope_len = L  # prefill positions are < L, whoever made them
    rating, rater_slot = _rating(rule, inp, model.config.num_attention_heads, seed)
    rating.window = window = sliding_window(model, L)
    act = Active(hidden=inp.embeds, orig=torch.arange(L, device=device)[None].expand(B, L), pos=inp.pos,
                 valid=inp.valid, visual=inp.visual, rater_slot=rater_slot, all_valid=all_valid)
    cache = PrunedCache() if use_cache else None
    if cache is not None:
        cache.in_sparse_forward = True
        cache.stage_valid.append(act.valid)
        cache.stage_all_valid.append(act.all_valid)
        cache.stage_pos.append(act.pos)
    stages = {s.layer: (j, s) for j, s in enumerate(shapes)}
    full = None
    mask = attention_mask_for(act.valid, causal, inp.embeds.dtype, impl, pos=act.pos, window=window)
    hidden_states = [] if output_hidden_states else None
    stage_index = 0
    for i, layer in enumerate(layers):
        j, shape = stages.get(i, (None, None))
        if shape is not None and shape.changes:
            if full is None:
                full = inp.embeds.new_zeros(B, L + 1, D)
            full = _scatter(full, act)
            act = _prune(layer, act, shape, inp.counts[j], rating, inp.fallback, rope_len, L, j)
            # Compaction puts every sample's surviving slots first: a causal pass serves.
            mask = attention_mask_for(act.valid, True, inp.embeds.dtype, impl, pos=act.pos, window=window)
            if cache is not None:
                cache.stage_valid.append(act.valid)
                cache.stage_all_valid.append(act.all_valid)
                cache.stage_pos.append(act.pos)
                stage_index += 1
        if cache is not None:
            cache.layer_stage.append(stage_index)
        if output_hidden_states:
            hidden_states.append(act.hidden if full is None else _scatter(full, act)[:, :L])
        act.hidden = _run_layer(model, layer, act.hidden, mask, act.pos, cache, use_cache)
    if cache is not None:
        cache.in_sparse_forward = False
    if full is None:
        last = act.hidden
        keep = act.valid.clone()
    else:
        last = _scatter(full, act)[:, :L]
        keep = torch.zeros(B, L + 1, dtype=torch.bool, device=device)
        keep = keep.scatter(1, act.orig, act.valid)[:, :L]
    last = model.norm(last)
    if output_hidden_states:
        hidden_states.append(last)
    return last, keep, cache, hidden_states


def sparse_prefill(model, state, layout: BatchLayout, plan: PrefillPlan, *, attention_mask, position_ids,
                   inputs_embeds, use_cache, output_hidden_states, return_dict):
    """Prefill (or training forward) of `model` (a LlamaModel) with pruning by `plan`."""
    ensure_rope(model.layers, inputs_embeds, inputs_embeds.shape[1])
    inp = prefill_inputs(layout, plan, inputs_embeds, position_ids)
    last, keep, cache, hidden_states = run_prefill(
        model, inp, stage_shapes(plan), plan.selection, state.config.seed, all_valid=layout.padding_side is None,
        causal=layout.causal, use_cache=use_cache, output_hidden_states=output_hidden_states)
    state.record(keep, prefill_stats(plan, [s.image_spans for s in layout.samples], model.config,
                                     len(model.layers)))
    return model_outputs(last, cache, hidden_states, return_dict)


def model_outputs(last, cache, hidden_states, return_dict):
    """What upstream's LlamaModel.forward returns."""
    outputs = (last, cache, tuple(hidden_states) if hidden_states is not None else None, None)
    if not return_dict:
        return tuple(v for v in outputs if v is not None)
    return BaseModelOutputWithPast(last_hidden_state=outputs[0], past_key_values=outputs[1],
                                   hidden_states=outputs[2], attentions=None)


def sparse_decode(model, cache: PrunedCache, *, input_ids, attention_mask, position_ids,
                  inputs_embeds, output_hidden_states, return_dict):
    """Decode steps over a pruned cache: each layer attends to exactly what it kept. Returns a
    new cache; `cache` itself is left as it was."""
    cache = cache.branch()
    mark_full_rope(model)
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(input_ids)
    B, s, _ = inputs_embeds.shape
    device = inputs_embeds.device
    past = cache.get_seq_length(0)
    if position_ids is None:
        position_ids = torch.arange(past, past + s, device=device)[None]
    ensure_rope(model.layers, inputs_embeds, past + s)
    new_valid = (attention_mask[:, -s:].bool() if attention_mask is not None
                 else torch.ones(B, s, dtype=torch.bool, device=device))
    impl = getattr(model.config, "_attn_implementation", "eager")
    # Flash attention unpads (with host syncs) in every layer given a 2-D mask: decide once
    # per step, as upstream does (`0 in attention_mask`), whether any mask is needed at all.
    new_all_valid = impl == "flash_attention_2" and bool(new_valid.all())
    window = sliding_window(model, past + s)
    new_pos = position_ids.expand(B, s)
    masks = []
    for st, valid in enumerate(cache.stage_valid):
        valid = torch.cat([valid, new_valid], 1)
        cache.stage_valid[st] = valid
        cache.stage_pos[st] = pos = torch.cat([cache.stage_pos[st].expand(B, -1), new_pos], 1)
        cache.stage_all_valid[st] = cache.stage_all_valid[st] and new_all_valid
        masks.append(attention_mask_for(valid, cache.stage_all_valid[st], inputs_embeds.dtype, impl,
                                        queries=s, pos=pos, window=window))

    hidden = inputs_embeds
    hidden_states = [] if output_hidden_states else None
    cache.in_sparse_forward = True
    try:
        with decode_attention_backends(device):
            for i, layer in enumerate(model.layers):
                if output_hidden_states:
                    hidden_states.append(hidden)
                out = layer(hidden, attention_mask=masks[cache.layer_stage[i]], position_ids=position_ids,
                            past_key_value=cache, output_attentions=False, use_cache=True)
                hidden = out[0]
    finally:
        cache.in_sparse_forward = False
    hidden = model.norm(hidden)
    if output_hidden_states:
        hidden_states.append(hidden)
    outputs = (hidden, cache, tuple(hidden_states) if output_hidden_states else None)
    if not return_dict:
        return tuple(v for v in outputs if v is not None)
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache,
                                   hidden_states=outputs[2], attentions=None)


def prefill_stats(plan: PrefillPlan, image_spans, model_config, num_layers: int, pruned: bool = True) -> dict:
    """What `last_stats` returns. `pruned=False`: the prefill ran upstream's dense forward
    (nothing to prune), so no selection FLOPs were spent."""
    samples = range(len(plan.visual_counts))
    return {
        "selection": plan.selection,
        "pruning_layers": [s.layer for s in plan.stages],
        "visual_tokens": list(plan.visual_counts),
        "kept_visual": [[s.kept[b] for s in plan.stages] for b in samples],
        "recycled": [[s.recycled[b] for s in plan.stages] for b in samples],
        "tokens_per_layer": plan.tokens_per_layer(num_layers),
        "image_spans": [list(spans) for spans in image_spans],
        "flops": flops_summary(plan if pruned else replace(plan, stages=[]), model_config, num_layers),
    }
