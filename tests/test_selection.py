"""Scoring and selection functions against naive, per-sample references."""

import math

import pytest
import torch

from sparsevlm_patch.selection import (
    gather_rows,
    rater_attention,
    rater_weights,
    recycle,
    select_raters,
    top_k_mask,
    visual_scores,
)


def _lengths_mask(lengths, width):
    return torch.arange(width)[None] < torch.tensor(lengths)[:, None]


def test_gather_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 4, 2, generator=g)
    index = torch.randint(0, 7, (3, 5), generator=g)
    out = gather_rows(x, index)
    assert out.shape == (3, 5, 4, 2)
    for b in range(3):
        assert torch.equal(out[b], x[b, index[b]])
    flat = torch.randn(2, 6, generator=g)
    assert torch.equal(gather_rows(flat, index[:2]), torch.stack([flat[b, index[b]] for b in range(2)]))


def naive_raters(visual, text):
    """relevance(t) = mean_v softmax_t(v . t); raters: relevance above its mean."""
    relevance = torch.softmax(visual.double() @ text.double().T, dim=-1).mean(0)
    raters = relevance > relevance.mean()
    if not raters.any():
        raters = torch.ones_like(raters)
    return raters


def test_select_raters_matches_a_per_sample_reference():
    g = torch.Generator().manual_seed(1)
    B, V, T, D = 4, 9, 7, 16
    visual = torch.randn(B, V, D, generator=g)
    text = torch.randn(B, T, D, generator=g)
    v_len, t_len = [9, 5, 1, 9], [7, 3, 6, 1]
    v_ok, t_ok = _lengths_mask(v_len, V), _lengths_mask(t_len, T)
    # Pad slots hold garbage that must not matter.
    visual[~v_ok] = 1e3
    text[~t_ok] = -1e3
    raters = select_raters(visual, v_ok, text, t_ok)
    assert raters.dtype == torch.bool and raters.shape == (B, T)
    for b in range(B):
        want = naive_raters(visual[b, : v_len[b]], text[b, : t_len[b]])
        assert torch.equal(raters[b, : t_len[b]], want), b
        assert not raters[b, t_len[b]:].any()
    # A single text token always rates; some but not all of several do (generic data).
    assert raters[3, 0]
    assert 0 < int(raters[0].sum()) < 7


def test_select_raters_without_text_selects_nothing():
    visual = torch.randn(2, 4, 8)
    text = torch.randn(2, 3, 8)
    raters = select_raters(visual, torch.ones(2, 4, dtype=torch.bool), text,
                           torch.tensor([[False] * 3, [True, True, False]]))
    assert not raters[0].any()
    assert raters[1, :2].any() and not raters[1, 2]


def eager_probs(q, k, valid):
    """Eager attention probabilities of a full causal pass: [H, N, N] for one sample."""
    N = q.shape[1]
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = valid[None, :] & torch.ones(N, N, dtype=torch.bool).tril()
    allowed = allowed | torch.eye(N, dtype=torch.bool)  # pad rows see themselves
    return logits.masked_fill(~allowed, torch.finfo(torch.float64).min).softmax(-1)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_rater_attention_equals_rows_of_eager_softmax(padding):
    g = torch.Generator().manual_seed(2)
    B, H, N, d = 3, 4, 12, 8
    q = torch.randn(B, H, N, d, generator=g) * 3
    k = torch.randn(B, H, N, d, generator=g) * 3
    lengths = [12, 9, 5]
    valid = _lengths_mask(lengths, N)
    if padding == "left":
        valid = valid.flip(1)
    # rater slots: a few valid slots per sample (not the last one), padded by repeating one
    slots = []
    for b in range(B):
        real = torch.nonzero(valid[b]).flatten().tolist()
        slots.append([real[1], real[-2], real[len(real) // 2], real[-1]])
    rater_slot = torch.tensor(slots)
    probs = rater_attention(gather_rows(q.transpose(1, 2), rater_slot).transpose(1, 2), k,
                            rater_slot, valid)
    assert probs.dtype == torch.float32 and probs.shape == (B, H, 4, N)
    for b in range(B):
        ref = eager_probs(q[b], k[b], valid[b])
        assert torch.allclose(probs[b].double(), ref[:, rater_slot[b]], atol=1e-6, rtol=0)
        # causal: nothing after the rater, nothing on pads
        for r, s in enumerate(rater_slot[b].tolist()):
            assert float(probs[b, :, r, s + 1:].abs().sum()) == 0.0
        assert float(probs[b][..., ~valid[b]].abs().sum()) == 0.0
    assert torch.allclose(probs.sum(-1), torch.ones(B, H, 4))


def test_visual_scores_average_heads_and_raters():
    g = torch.Generator().manual_seed(3)
    B, H, R, N = 2, 3, 4, 10
    probs = torch.rand(B, H, R, N, generator=g)
    raters = torch.tensor([[True, False, True, True], [False, True, False, False]])
    visual = torch.zeros(B, N, dtype=torch.bool)
    visual[0, 2:7] = True
    visual[1, [1, 4, 9]] = True
    scores = visual_scores(probs, rater_weights(raters, H), visual)
    for b in range(B):
        rows = [r for r in range(R) if raters[b, r]]
        want = probs[b][:, rows].mean(dim=(0, 1))
        assert torch.allclose(scores[b][visual[b]], want[visual[b]], atol=1e-6)
        assert torch.isinf(scores[b][~visual[b]]).all() and (scores[b][~visual[b]] < 0).all()


def test_top_k_mask_with_per_sample_k():
    g = torch.Generator().manual_seed(4)
    B, N = 4, 20
    scores = torch.randn(B, N, generator=g)
    scores[2, 10:] = float("-inf")  # only 10 candidates in sample 2
    k = torch.tensor([5, 0, 10, 1])
    mask = top_k_mask(scores, k, 10)
    assert mask.dtype == torch.bool and mask.shape == (B, N)
    for b in range(B):
        assert int(mask[b].sum()) == int(k[b])
        want = set(scores[b].argsort(descending=True)[: int(k[b])].tolist())
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == want
    assert not top_k_mask(scores, torch.zeros(B, dtype=torch.long), 0).any()


def test_recycle_merges_candidates_into_cluster_means():
    g = torch.Generator().manual_seed(5)
    B, N, D = 3, 16, 6
    hidden = torch.randn(B, N, D, generator=g)
    scores = torch.rand(B, N, generator=g)
    pruned = torch.zeros(B, N, dtype=torch.bool)
    pruned[0, 2:14] = True
    pruned[1, ::2] = True
    pruned[2, 5:9] = True
    n_cand = torch.tensor([6, 4, 0])
    n_clu = torch.tensor([2, 3, 0])
    out = recycle(hidden, scores, pruned, n_cand, n_clu, max_candidates=6, max_clusters=3)
    assert out.shape == (B, 3, D) and out.dtype == hidden.dtype
    for b in range(B):
        ranked = [i for i in scores[b].argsort(descending=True).tolist() if pruned[b, i]]
        cand = ranked[: int(n_cand[b])]
        centres = cand[: int(n_clu[b])]
        groups = {c: [] for c in range(len(centres))}
        for i in cand:
            sims = [torch.nn.functional.cosine_similarity(hidden[b, i], hidden[b, j], dim=0)
                    for j in centres]
            groups[int(torch.stack(sims).argmax())].append(i)
        for c, members in groups.items():
            assert members, "a centre always joins its own cluster"
            assert torch.allclose(out[b, c], hidden[b, members].mean(0), atol=1e-6), (b, c)
        # rows past this sample's cluster count carry nothing
        assert float(out[b, len(centres):].abs().sum()) == 0.0
    assert recycle(hidden, scores, pruned, n_cand, n_clu, 6, 0).shape == (B, 0, D)


def test_recycled_tokens_keep_the_hidden_dtype_when_sums_come_back_fp32(monkeypatch):
    """CUDA autocast runs `sum` in fp32 (CPU autocast does not): the cluster sizes come back
    fp32 and the means would too, and a bf16 student's hidden states could no longer be
    scattered back (GPU distillation with --bf16 failed so)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 12, 8, generator=g).to(torch.bfloat16)
    scores = torch.rand(2, 12, generator=g)
    pruned = torch.ones(2, 12, dtype=torch.bool)
    sum_in_bf16 = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: sum_in_bf16(self, *a, **k).float())
    out = recycle(hidden, scores, pruned, torch.tensor([5, 3]), torch.tensor([2, 1]), max_candidates=5,
                  max_clusters=2)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_layer_scores_equal_eager_attention_with_and_without_grouped_kv_heads(kv_heads):
    """`_scores` rotates keys and rater queries together when every head has its own keys,
    separately under grouped-query attention: both equal eager attention's probabilities."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sparsevlm_patch.sparse_forward import Active, _scores

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=64)
    config._attn_implementation = "eager"
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in layer.self_attn.parameters():
            p.mul_(8)  # sharper attention than the default init
    B, N = 2, 12
    hidden = torch.randn(B, N, 32)
    pos = torch.arange(N)[None].expand(B, N)
    visual = torch.zeros(B, N, dtype=torch.bool)
    visual[:, 2:8] = True
    rater_slot = torch.tensor([[8, 9, 11], [9, 10, 11]])
    raters = torch.tensor([[True, True, False], [True, True, True]])
    act = Active(hidden=hidden, orig=pos, pos=pos, valid=torch.ones(B, N, dtype=torch.bool), visual=visual,
                 rater_slot=rater_slot, all_valid=True)
    scores = _scores(layer, act, rater_weights(raters, 4), rope_len=N)

    causal = torch.full((N, N), torch.finfo(torch.float32).min).triu(1)[None, None].expand(B, 1, N, N)
    with torch.no_grad():
        _, probs, _ = layer.self_attn(layer.input_layernorm(hidden), attention_mask=causal, position_ids=pos,
                                      output_attentions=True)
    for b in range(B):
        rows = rater_slot[b][raters[b]]
        want = probs[b][:, rows].mean(dim=(0, 1))
        assert torch.allclose(scores[b][visual[b]], want[visual[b]], atol=1e-6, rtol=0)
        assert torch.isinf(scores[b][~visual[b]]).all()
