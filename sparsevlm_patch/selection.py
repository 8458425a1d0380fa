"""SparseVLM scoring and selection, as pure functions on padded batch tensors.

Shapes: B samples, N token slots, D hidden size, H heads, R rater slots. Every count that
varies per sample arrives as a [B] tensor next to a host-side maximum, so all shapes are
fixed before the layers run and nothing here waits on the device.
"""
from __future__ import annotations

import math

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...], index [B, M] -> [B, M, ...]."""
    shape = index.shape + x.shape[2:]
    flat = index.reshape(index.shape[0], -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, flat).reshape(shape)


def select_raters(
    visual: torch.Tensor, visual_valid: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor
) -> torch.Tensor:
    """Text raters of each sample, from the LLM-input embeddings.

    relevance(t) = mean over visual tokens v of softmax_t(v . t); raters are the text
    tokens whose relevance is above the sample's mean relevance (all text tokens when
    none is, e.g. a single one). visual [B, V, D], text [B, T, D] -> bool [B, T].
    """
    logits = torch.einsum("bvd,btd->bvt", visual.float(), text.float())
    logits = logits.masked_fill(~text_valid[:, None, :], torch.finfo(logits.dtype).min)
    probs = logits.softmax(dim=-1) * visual_valid[:, :, None]
    relevance = probs.sum(1) / visual_valid.sum(1, keepdim=True).clamp(min=1)
    mean = (relevance * text_valid).sum(1, keepdim=True) / text_valid.sum(1, keepdim=True).clamp(min=1)
    raters = (relevance > mean) & text_valid
    none = ~raters.any(dim=1, keepdim=True)
    return raters | (none & text_valid)


def rater_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    rater_slot: torch.Tensor,
    key_valid: torch.Tensor,
    in_window: torch.Tensor = None,
) -> torch.Tensor:
    """Attention probabilities of the rater rows, as eager attention computes them.

    query [B, H, R, d] (RoPE applied), key [B, H, N, d] (RoPE applied, heads repeated),
    rater_slot [B, R]: each rater's own slot (causal limit), key_valid [B, N].
    Returns float32 [B, H, R, N]; softmax over the full key range. Memory is R x N per
    head, never N x N.
    """
    # Eager attention's own numerics: logits in the model's dtype, softmax in float32.
    logits = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    slots = torch.arange(key.shape[2], device=key.device)
    allowed = key_valid[:, None, :] & (slots[None, None, :] <= rater_slot[:, :, None])
    if in_window is not None:  # bool [B, R, N]: keys within the model's sliding window
        allowed = allowed & in_window
    logits = torch.where(allowed[:, None], logits, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1, dtype=torch.float32)


def rater_weights(raters: torch.Tensor, heads: int) -> torch.Tensor:
    """float [B, R]: 1 / (raters x heads) on each sample's raters, 0 elsewhere, so that one
    weighted sum over heads and raters is their mean (computed once per forward)."""
    raters = raters.float()
    return raters / (raters.sum(1, keepdim=True).clamp(min=1) * heads)


def visual_scores(
    probs: torch.Tensor, rater_weight: torch.Tensor, visual: torch.Tensor
) -> torch.Tensor:
    """Score of each visual slot: rater -> visual attention averaged over heads and raters.

    probs [B, H, R, N], rater_weight [B, R] from `rater_weights`, visual [B, N].
    Non-visual slots score -inf.
    """
    scores = torch.einsum("bhrn,br->bn", probs, rater_weight)
    return torch.where(visual, scores, float("-inf"))


def top_k_mask(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """bool [B, N]: the k[b] best-scoring slots of each row (k_max = max(k) on the host)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k_max == 0:
        return keep
    best = scores.topk(k_max, dim=1).indices
    rank_ok = torch.arange(k_max, device=scores.device)[None, :] < k[:, None]
    return keep.scatter(1, best, rank_ok)


def recycle(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    pruned: torch.Tensor,
    n_candidates: torch.Tensor,
    n_clusters: torch.Tensor,
    max_candidates: int,
    max_clusters: int,
) -> torch.Tensor:
    """Merge the most relevant pruned tokens into a few recycled tokens.

    The n_candidates[b] best-scoring pruned slots are candidates; the n_clusters[b] best
    of them are cluster centres; every candidate joins its most cosine-similar centre and
    each cluster is averaged. Returns [B, max_clusters, D] (rows past n_clusters[b] are
    padding). One assignment step, fixed shapes: no iteration, no host sync. The sums are a
    matmul with the one-hot assignment, not a scatter_add, whose atomics on a GPU would make
    the recycled tokens (and every later selection) differ from run to run. The result is in
    `hidden`'s dtype: under CUDA autocast `sum` returns fp32, and the mean would follow it.
    """
    B, _, D = hidden.shape
    if max_clusters == 0:
        return hidden.new_zeros(B, 0, D)
    ranked = torch.where(pruned, scores, float("-inf")).topk(max_candidates, dim=1).indices
    cand = gather_rows(hidden, ranked)  # [B, C, D], best first
    cand_valid = torch.arange(max_candidates, device=hidden.device)[None] < n_candidates[:, None]
    centres = torch.arange(max_clusters, device=hidden.device)
    centre_valid = centres[None] < n_clusters[:, None]
    unit = torch.nn.functional.normalize(cand.float(), dim=-1)
    sim = torch.einsum("bcd,bkd->bck", unit, unit[:, :max_clusters])
    sim = torch.where(centre_valid[:, None, :], sim, float("-inf"))
    cluster = sim.argmax(dim=-1)  # [B, C]
    assign = ((cluster[..., None] == centres) & cand_valid[..., None]).to(hidden.dtype)  # [B, C, K]
    sums = assign.transpose(1, 2) @ cand
    sizes = assign.sum(1)
    return (sums / sizes.clamp(min=1)[..., None]).to(hidden.dtype)


# ----------------------------------------------------------------------------- other rules

def last_rater(candidates: torch.Tensor) -> torch.Tensor:
    """FastV's rater: the last prompt token alone. candidates: bool [B, R] (valid rater slots,
    in order) -> bool [B, R], True at the last valid one."""
    last = candidates.sum(1, keepdim=True) - 1
    return (torch.arange(candidates.shape[1], device=candidates.device)[None] == last) & candidates


def rope_only_logits(cos: torch.Tensor, sin: torch.Tensor, query_pos: torch.Tensor,
                     key_pos: torch.Tensor) -> torch.Tensor:
    """SparseVLM v2.0's "attention gravity": the attention logit that RoPE alone gives a pair
    of positions, i.e. an all-ones query and an all-ones key, each rotated at its position,
    dot product over sqrt(head_dim). cos/sin [P, d]; query_pos [B, R], key_pos [B, N] ->
    float32 [B, R, N]."""
    d = cos.shape[-1]
    sign = torch.ones(d, device=cos.device)
    sign[: d // 2] = -1
    rotated_ones = cos.float() + sign * sin.float()  # ones * cos + rotate_half(ones) * sin
    q, k = rotated_ones[query_pos], rotated_ones[key_pos]
    return torch.einsum("brd,bnd->brn", q, k) / math.sqrt(d)


def head_count_v2(heads: int) -> int:
    """Heads kept by v2.0: 14 of 32 on a 7B, the same share of other models (at least one)."""
    return max(1, round(heads * 14 / 32))


def v2_scores(probs: torch.Tensor, rope_logits: torch.Tensor, raters: torch.Tensor,
              visual: torch.Tensor, heads_kept: int) -> torch.Tensor:
    """SparseVLM v2.0's score of each visual slot.

    Every rater -> token probability is divided by the RoPE-only logit of its pair of
    positions; per sample, the `heads_kept` heads with the largest corrected rater -> visual
    attention are kept; a visual slot's score is its corrected attention averaged over those
    heads and the raters. probs [B, H, R, N], rope_logits [B, R, N], raters bool [B, R],
    visual [B, N] -> [B, N] (non-visual slots -inf)."""
    corrected = probs / rope_logits[:, None]
    rater_mean = raters.float() / raters.sum(1, keepdim=True).clamp(min=1)
    per_head = torch.einsum("bhrn,br->bhn", corrected, rater_mean)  # [B, H, N]
    per_head = torch.where(visual[:, None], per_head, 0.0)
    totals = per_head.sum(-1)
    kept = top_k_mask(totals, torch.full_like(totals[:, 0], heads_kept, dtype=torch.long), heads_kept)
    scores = torch.einsum("bhn,bh->bn", per_head, kept.float()) / heads_kept
    return torch.where(visual, scores, float("-inf"))


def random_scores(rank: torch.Tensor, visual: torch.Tensor, seed: int, stage: int) -> torch.Tensor:
    """Seeded uniform scores for the `random` rule: a hash of (seed, pruning stage, the
    token's rank among its sample's visual tokens), so a sample gets the same selection
    alone, in any batch and on any device, with no generator state. rank [B, N] -> float64
    [B, N] (non-visual slots -inf)."""
    mask = 0xFFFFFFFF
    x = (rank * 0x9E3779B1 + ((seed * 0x85EBCA6B + (stage + 1) * 0xC2B2AE35) & mask)) & mask
    for _ in range(2):  # xorshift-multiply: a bijection of 32-bit integers, so no ties
        x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    x = (x >> 16) ^ x
    return torch.where(visual, x.double(), float("-inf"))
