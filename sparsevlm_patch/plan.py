"""Host-side plan of one sparse prefill: token counts per sample and layer, and FLOPs.

Everything the layers need to know about sizes is decided here, once per batch, before
any layer runs, so the forward itself never asks the device for a number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from .config import SparseConfig, recycle_candidates, recycle_counts
from .layout import BatchLayout


@dataclass
class StagePlan:
    """Per-sample counts of one pruning layer."""

    layer: int
    kept: List[int]  # visual tokens kept (top-k of the pool)
    candidates: List[int]  # pruned tokens considered for recycling
    recycled: List[int]  # merged tokens added
    tokens_before: List[int]  # active tokens reaching this layer
    tokens: List[int]  # active tokens from this layer on

    @property
    def changes(self) -> bool:
        return any(r > 0 for r in self.recycled) or self.tokens != self.tokens_before


@dataclass
class PrefillPlan:
    stages: List[StagePlan]
    valid_counts: List[int]
    visual_counts: List[int]
    rater_counts: List[int]  # rater slots (question tokens; 1 for fastv) per sample
    selection: str = "sparsevlm"

    def tokens_per_layer(self, num_layers: int) -> List[List[int]]:
        per_sample = []
        for b, valid in enumerate(self.valid_counts):
            counts, current, stages = [], valid, iter(self.stages)
            stage = next(stages, None)
            for i in range(num_layers):
                if stage is not None and stage.layer == i:
                    current = stage.tokens[b]
                    stage = next(stages, None)
                counts.append(current)
            per_sample.append(counts)
        return per_sample


def make_plan(config: SparseConfig, layout: BatchLayout) -> PrefillPlan:
    valid = [s.valid_count for s in layout.samples]
    visual = layout.visual_counts
    schedules = [config.keep_counts(v) for v in visual]
    pool, tokens = list(visual), list(valid)
    stages = []
    for j, layer in enumerate(config.pruning_layers):
        kept = [min(sched[j], p) for sched, p in zip(schedules, pool)]
        rec = [recycle_counts(p, k) if config.recycle else 0 for p, k in zip(pool, kept)]
        cand = [recycle_candidates(p, k) if r else 0 for p, k, r in zip(pool, kept, rec)]
        new_tokens = [t - p + k + r for t, p, k, r in zip(tokens, pool, kept, rec)]
        stages.append(StagePlan(layer, kept, cand, rec, list(tokens), new_tokens))
        pool = [k + r for k, r in zip(kept, rec)]
        tokens = new_tokens
    raters = [min(1, s.question_span[1] - s.question_span[0]) if config.selection == "fastv"
              else s.question_span[1] - s.question_span[0] for s in layout.samples]
    return PrefillPlan(stages, valid, visual, raters, config.selection)


def text_only_plan(config: SparseConfig, valid_counts: List[int]) -> PrefillPlan:
    """The plan of a batch without visual tokens: every pruning layer keeps every token."""
    B = len(valid_counts)
    stages = [StagePlan(layer, [0] * B, [0] * B, [0] * B, list(valid_counts), list(valid_counts))
              for layer in config.pruning_layers]
    return PrefillPlan(stages, list(valid_counts), [0] * B, [0] * B, config.selection)


def layer_flops(tokens: int, context: int, hidden: int, kv_hidden: int, mlp: int) -> float:
    """Analytic forward FLOPs of one decoder layer: projections, MLP and attention."""
    linear = 2 * tokens * (hidden * (2 * hidden + 2 * kv_hidden) + 3 * hidden * mlp)
    attention = 2 * 2 * tokens * context * hidden / 2  # QK^T and AV, causal half
    return linear + attention


def flops_summary(plan: PrefillPlan, model_config, num_layers: int) -> dict:
    """Prefill FLOPs of the decoder stack, sparse (selection included) and dense."""
    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    kv_hidden = hidden * getattr(model_config, "num_key_value_heads", heads) // heads
    mlp = model_config.intermediate_size
    sparse = dense = 0.0
    per_sample = plan.tokens_per_layer(num_layers)
    for b, counts in enumerate(per_sample):
        for n in counts:
            sparse += layer_flops(n, n, hidden, kv_hidden, mlp)
        dense += num_layers * layer_flops(plan.valid_counts[b], plan.valid_counts[b], hidden, kv_hidden, mlp)
    head_dim = hidden // heads
    for stage in plan.stages:
        for n, r in zip(stage.tokens_before, plan.rater_counts):
            if plan.selection == "random":
                continue  # a hash per token: no matmul
            # selection: keys of all tokens, rater queries, rater x token scores
            sparse += 2 * n * hidden * kv_hidden + 2 * r * hidden * hidden + 2 * r * n * hidden
            if plan.selection == "sparsevlm_v2":
                # the RoPE-only logits (rater x token dot products) and the correction per head
                sparse += 2 * r * n * head_dim + r * n * heads
    return {"sparse": sparse, "dense": dense, "ratio": dense / sparse if sparse else 1.0}
