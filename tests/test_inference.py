"""Sparse inference against the upstream model (tiny LLaVA, 16 layers, 576 visual tokens).

References are upstream's own code: a process that never imported the plugin, a disabled
model, upstream's eager attention with ``output_attentions=True``, and a naive pruned
forward written here (boolean-indexed token lists through upstream's decoder layers).
"""
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import sparsevlm_patch
from sparsevlm_patch import sparse_forward
from sparsevlm_patch.config import recycle_counts
from sparsevlm_patch.sparse_forward import PrunedCache

import upstream_cases

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

QUESTIONS = (
    "What color is the shape in the top-left?",
    "How many shapes are in the image? Answer with one word, please, and be brief.",
)
TEXT_QUESTION = "Describe a red circle in one short sentence."
NUM_VISUAL = 576
SCHEDULE_64 = (66, 30, 17)
ATOL = 2e-5  # fp32, same kernels, different batch composition / masks


# ----------------------------------------------------------------------------- inputs

def image_prompt(tokenizer, question):
    from sparsevlm_patch.tiny import prompt_ids

    return prompt_ids(tokenizer, question)


def text_prompt(tokenizer, question):
    from llava.conversation import conv_templates

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return tokenizer(conv.get_prompt(), return_tensors="pt").input_ids[0]


def pad(seqs, pad_id, side):
    """(ids [B, L], attention_mask [B, L]) of 1-D sequences padded on `side`."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[b, cols] = s
        mask[b, cols] = 1
    return ids, mask


def pixels(model, image_processor, images):
    from llava.mm_utils import process_images

    return process_images(images, image_processor, model.config)


def mixed_batch(tokenizer, model, image_processor, images):
    """Two image prompts of different lengths and a text-only prompt. Upstream's splice
    consumes one image per text-only sample of a batch, so that one gets a dummy (zero)
    image."""
    seqs = [image_prompt(tokenizer, QUESTIONS[0]), image_prompt(tokenizer, QUESTIONS[1]),
            text_prompt(tokenizer, TEXT_QUESTION)]
    assert len({len(s) for s in seqs}) == 3
    pix = pixels(model, image_processor, images)
    batch_pixels = torch.cat([pix, torch.zeros_like(pix[:1])])
    sizes = [image.size for image in images] + [images[0].size]
    return seqs, pix, batch_pixels, sizes


def valid_cols(side, length, n):
    return slice(0, n) if side == "right" else slice(length - n, length)


def forward(model, ids, **kwargs):
    with torch.inference_mode():
        return model(ids, **kwargs)


def image_start(ids):
    """Column of the first image placeholder of a [1, L] prompt."""
    from llava.constants import IMAGE_TOKEN_INDEX

    return int(torch.nonzero(ids[0] == IMAGE_TOKEN_INDEX)[0, 0])


def visual_keep(keep_row, start, count=NUM_VISUAL):
    return keep_row[start:start + count]


# ----------------------------------------------------------------------------- plugin off

def make_inputs(tokenizer, model, image_processor, images):
    seqs, pix, batch_pixels, sizes = mixed_batch(tokenizer, model, image_processor, images)
    right_ids, right_mask = pad(seqs, tokenizer.pad_token_id, "right")
    left_ids, left_mask = pad(seqs, tokenizer.pad_token_id, "left")
    return {"single_ids": seqs[0][None], "single_pixels": pix[:1], "sizes": sizes,
            "batch_pixels": batch_pixels, "right_ids": right_ids, "right_mask": right_mask,
            "left_ids": left_ids, "left_mask": left_mask, "text_ids": seqs[2][None]}


@pytest.fixture(scope="module")
def upstream(tiny_llava_dir, tiny_images, tmp_path_factory):
    """Outputs of a process that never imported the plugin, plus the checks it made after
    importing it with SPARSEVLM=0 (see upstream_cases.main)."""
    from conftest import load_tiny_llava

    tokenizer, model, image_processor = load_tiny_llava(tiny_llava_dir)
    inputs = make_inputs(tokenizer, model, image_processor, tiny_images)
    folder = tmp_path_factory.mktemp("upstream")
    torch.save(inputs, folder / "inputs.pt")
    env = dict(os.environ, SPARSEVLM="0", PYTHONPATH=os.pathsep.join(
        [REPO, HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "upstream_cases.py"), tiny_llava_dir,
         str(folder / "inputs.pt"), str(folder / "out.pt"), str(torch.get_num_threads())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(folder / "out.pt")
    result["inputs"] = inputs
    return result


def assert_bit_identical(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), (key, (got[key].float() - want[key].float()).abs().max())


def test_plugin_off_by_env_is_upstream(upstream):
    checks = upstream["checks"]
    assert checks["untouched_after_import"]
    assert_bit_identical(upstream["off"], upstream["reference"])


def test_apply_and_remove_restore_the_exact_functions(upstream):
    checks = upstream["checks"]
    assert checks == {"untouched_after_import": True, "wrapped_after_apply": True,
                      "wraps_originals": True, "identical_after_remove": True,
                      "identical_after_second_remove": True}


def test_disabled_model_is_upstream(upstream, tiny_llava):
    model = tiny_llava[1]
    sparsevlm_patch.enable(model, retain_tokens=64)
    sparsevlm_patch.disable(model)
    assert_bit_identical(upstream_cases.outputs(model, upstream["inputs"]), upstream["reference"])
    assert sparsevlm_patch.last_keep_mask(model) is None


def test_removed_plugin_is_upstream(upstream, tiny_llava):
    model = tiny_llava[1]
    sparsevlm_patch.enable(model, retain_tokens=64)
    targets = upstream_cases.patch_targets()
    wrappers = upstream_cases.current(targets)
    originals = [w.__wrapped__ for w in wrappers]
    assert all(isinstance(o, types.FunctionType) for o in originals)
    try:
        sparsevlm_patch.remove()
        assert all(a is b for a, b in zip(upstream_cases.current(targets), originals))
        got = upstream_cases.outputs(model, upstream["inputs"])
    finally:
        sparsevlm_patch.apply()
    assert_bit_identical(got, upstream["reference"])
    # apply() wraps the same originals again, and the model prunes again
    assert [w.__wrapped__ for w in upstream_cases.current(targets)] == originals
    forward(model, upstream["inputs"]["single_ids"], images=upstream["inputs"]["single_pixels"],
            image_sizes=upstream["inputs"]["sizes"][:1])
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [list(SCHEDULE_64)]


def test_text_only_prompt_on_enabled_model_is_upstream(upstream, tiny_llava):
    model = tiny_llava[1]
    sparsevlm_patch.enable(model, retain_tokens=64)
    text_ids = upstream["inputs"]["text_ids"]
    logits = forward(model, text_ids).logits
    assert torch.equal(logits, upstream["reference"]["text"])
    keep = sparsevlm_patch.last_keep_mask(model)
    assert keep.dtype == torch.bool and keep.shape == text_ids.shape and keep.all()


# ----------------------------------------------------------------------------- nothing pruned

@pytest.mark.parametrize("settings", [
    dict(keep_schedule=(576, 576, 576), recycle=False),
    dict(keep_schedule=(1000, 800, 600), recycle=True),  # clipped to 576: nothing to recycle
    dict(retain_tokens=576, recycle=False),
    dict(retain_tokens=576, pruning_layers=(1, 8), recycle=False),
])
@pytest.mark.parametrize("side", ["single", "right", "left"])
def test_nothing_pruned_equals_upstream(tiny_llava, tiny_images, settings, side):
    tokenizer, model, image_processor = tiny_llava
    seqs, pix, batch_pixels, sizes = mixed_batch(tokenizer, model, image_processor, tiny_images)
    if side == "single":
        kwargs = dict(images=pix[:1], image_sizes=sizes[:1])
        ids = seqs[0][None]
        labels = ids.clone()
        labels[:, :5] = -100
    else:
        model.config.tokenizer_padding_side = side
        ids, mask = pad(seqs, tokenizer.pad_token_id, side)
        # labels on text only, the first tokens of each sample ignored (as upstream's
        # preprocessing does): a left pad's logits never enter the loss
        labels = ids.masked_fill((mask == 0) | (mask.cumsum(1) <= 5), -100)
        kwargs = dict(attention_mask=mask, images=batch_pixels, image_sizes=sizes)
    sparsevlm_patch.disable(model)
    dense = forward(model, ids, labels=labels, output_hidden_states=True, **kwargs)
    sparsevlm_patch.enable(model, **settings)
    sparse = forward(model, ids, labels=labels, output_hidden_states=True, **kwargs)
    keep = sparsevlm_patch.last_keep_mask(model)
    stats = sparsevlm_patch.last_stats(model)
    if side == "single":
        valid = torch.ones(1, len(seqs[0]) - 1 + NUM_VISUAL, dtype=torch.bool)
    else:
        # the relaid validity of each sample, in upstream's own coordinates
        L = keep.shape[1]
        valid = torch.zeros(3, L, dtype=torch.bool)
        for b in range(3):
            n = len(seqs[b]) - 1 + NUM_VISUAL if b < 2 else len(seqs[b])
            valid[b, valid_cols(side, L, n)] = True
        assert stats["visual_tokens"] == [NUM_VISUAL, NUM_VISUAL, 0]
    # Nothing to prune runs upstream's forward itself: equal everywhere, pads included.
    assert torch.equal(sparse.logits, dense.logits)
    assert torch.equal(sparse.loss, dense.loss)
    assert len(sparse.hidden_states) == len(dense.hidden_states) == 17
    for got, want in zip(sparse.hidden_states, dense.hidden_states):
        assert torch.equal(got, want)
    assert torch.equal(keep, valid)
    assert stats["flops"]["ratio"] == 1.0 and stats["flops"]["sparse"] == stats["flops"]["dense"]
    assert len(stats["tokens_per_layer"][0]) == 16
    assert stats["kept_visual"][0] == [NUM_VISUAL] * len(stats["pruning_layers"])
    assert stats["recycled"][0] == [0] * len(stats["pruning_layers"])


@pytest.mark.parametrize("retain, prunes", [(256, False), (300, False), (255, True)])
def test_a_tower_of_256_tokens_prunes_only_below_its_count(tmp_path, tiny_images, retain, prunes):
    """A budget at or above the visual count means upstream (contract 2) for any tower, not
    only CLIP-336's 576 tokens; below it, the sparse forward runs."""
    from conftest import load_tiny_llava
    from sparsevlm_patch.tiny import build_tiny_llava

    tokenizer, model, image_processor = load_tiny_llava(
        build_tiny_llava(str(tmp_path), image_size=224, weight_scale=10.0))
    ids = image_prompt(tokenizer, QUESTIONS[0])[None]
    pix = pixels(model, image_processor, tiny_images[:1])
    sparsevlm_patch.disable(model)
    dense = forward(model, ids, images=pix, image_sizes=[tiny_images[0].size])
    sparsevlm_patch.enable(model, retain_tokens=retain)
    sparse = forward(model, ids, images=pix, image_sizes=[tiny_images[0].size])
    stats = sparsevlm_patch.last_stats(model)
    assert stats["visual_tokens"] == [256]
    assert (stats["kept_visual"][0] != [256] * 3) == prunes
    assert torch.equal(sparse.logits, dense.logits) != prunes


def test_nothing_pruned_generation_equals_upstream(upstream, tiny_llava):
    model = tiny_llava[1]
    sparsevlm_patch.enable(model, keep_schedule=(576, 576, 576), recycle=False)
    inputs = upstream["inputs"]
    model.config.tokenizer_padding_side = "left"
    kwargs = dict(attention_mask=inputs["left_mask"], images=inputs["batch_pixels"],
                  image_sizes=inputs["sizes"], max_new_tokens=upstream_cases.MAX_NEW_TOKENS,
                  do_sample=False)
    with torch.inference_mode():
        out = model.generate(inputs["left_ids"], **kwargs)
        beams = model.generate(inputs["left_ids"], num_beams=2, **kwargs)
        assert not isinstance(model.generate(inputs["left_ids"], return_dict_in_generate=True, **kwargs)
                              .past_key_values, PrunedCache)  # upstream's own cache: nothing was pruned
        sparsevlm_patch.disable(model)
        dense_beams = model.generate(inputs["left_ids"], num_beams=2, **kwargs)
    assert torch.equal(out, upstream["reference"]["generate_left"])
    assert torch.equal(beams, dense_beams)  # beam search reorders the pruned cache


# ----------------------------------------------------------------------------- schedule

def layer_input_lengths(model):
    """Record the sequence length every decoder layer runs on (pre-forward hooks)."""
    lengths, handles = [], []
    for layer in model.get_model().layers:
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs: lengths.append(
                (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True))
    return lengths, handles


@pytest.mark.parametrize("recycle", [False, True])
def test_kept_tokens_per_layer_follow_the_schedule(tiny_llava, tiny_images, recycle):
    tokenizer, model, image_processor = tiny_llava
    ids = image_prompt(tokenizer, QUESTIONS[0])[None]
    start = image_start(ids)
    sparsevlm_patch.enable(model, retain_tokens=64, recycle=recycle)
    lengths, handles = layer_input_lengths(model)
    try:
        out = forward(model, ids, images=pixels(model, image_processor, tiny_images[:1]),
                      image_sizes=[tiny_images[0].size])
    finally:
        for h in handles:
            h.remove()
    L = ids.shape[1] - 1 + NUM_VISUAL
    text = L - NUM_VISUAL
    assert out.logits.shape[:2] == (1, L)  # original coordinates

    # what the layers really ran on: text + kept + recycled
    recycled, pool = [], NUM_VISUAL
    for k in SCHEDULE_64:
        recycled.append(recycle_counts(pool, k) if recycle else 0)
        pool = k + recycled[-1]
    expected = ([L] * 2 + [text + SCHEDULE_64[0] + recycled[0]] * 4
                + [text + SCHEDULE_64[1] + recycled[1]] * 9 + [text + SCHEDULE_64[2] + recycled[2]])
    assert lengths == expected
    if recycle:
        assert recycled == [7, 3, 2]

    stats = sparsevlm_patch.last_stats(model)
    assert stats["pruning_layers"] == [2, 6, 15]
    assert stats["visual_tokens"] == [NUM_VISUAL]
    assert stats["kept_visual"] == [list(SCHEDULE_64)]
    assert stats["recycled"] == [recycled]
    assert stats["tokens_per_layer"] == [expected]
    assert stats["image_spans"] == [[(start, NUM_VISUAL)]]
    assert stats["flops"]["sparse"] < stats["flops"]["dense"] and stats["flops"]["ratio"] > 3

    keep = sparsevlm_patch.last_keep_mask(model)
    assert keep.dtype == torch.bool and keep.shape == (1, L)
    text_cols = torch.ones(L, dtype=torch.bool)
    text_cols[start:start + NUM_VISUAL] = False
    assert keep[0, text_cols].all()  # text and system tokens are never pruned
    kept_visual = int(visual_keep(keep[0], start).sum())
    if recycle:  # recycled tokens join the pool and have no original position
        assert SCHEDULE_64[2] - sum(recycled[:2]) <= kept_visual <= SCHEDULE_64[2]
    else:
        assert kept_visual == SCHEDULE_64[2]


def test_a_different_question_changes_the_selection(tiny_llava, tiny_images):
    tokenizer, model, image_processor = tiny_llava
    pix = pixels(model, image_processor, tiny_images[:1])
    sparsevlm_patch.enable(model, retain_tokens=64, recycle=False)
    selections = []
    for question in (QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]):
        ids = image_prompt(tokenizer, question)[None]
        forward(model, ids, images=pix, image_sizes=[tiny_images[0].size])
        selections.append(visual_keep(sparsevlm_patch.last_keep_mask(model)[0], image_start(ids)))
    assert all(int(s.sum()) == SCHEDULE_64[2] for s in selections)
    assert not torch.equal(selections[0], selections[1])
    assert torch.equal(selections[0], selections[2])


# ----------------------------------------------------------------------------- naive reference

class FullTableRotary(torch.nn.Module):
    """Upstream's RoPE, always returning its whole cached table: a boolean-indexed sequence
    keeps its original position ids, which reach past its own length."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, seq_len=None):
        return self.inner(x, seq_len=max(seq_len or 0, self.inner.max_seq_len_cached))


@pytest.fixture(scope="module")
def reference_models(tiny_llava_dir):
    """(eager, sdpa): the same weights loaded by upstream's loader, plugin disabled; the
    eager one with attn_implementation="eager" (probabilities), the SDPA one for the
    hidden states (same kernels as the model under test)."""
    from llava.model.builder import load_pretrained_model

    from conftest import load_tiny_llava

    _, eager, _, _ = load_pretrained_model(tiny_llava_dir, None, "tiny-llava-v1", device="cpu",
                                           device_map="cpu", attn_implementation="eager")
    eager.float().eval()
    sdpa = load_tiny_llava(tiny_llava_dir)[1]
    assert eager.config._attn_implementation == "eager"
    assert type(eager.get_model().layers[0].self_attn).__name__ == "LlamaAttention"
    assert type(sdpa.get_model().layers[0].self_attn).__name__ == "LlamaSdpaAttention"
    for model in (eager, sdpa):
        sparsevlm_patch.disable(model)
        for layer in model.get_model().layers:
            layer.self_attn.rotary_emb = FullTableRotary(layer.self_attn.rotary_emb)
    return eager, sdpa


def causal_mask(n):
    return torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]


def naive_raters(embeds, visual, question):
    """Text raters: relevance = softmax over text of V.T^T, averaged over visual tokens;
    raters are the question tokens whose relevance is above the mean."""
    relevance = torch.softmax(embeds[visual] @ embeds[question].T, dim=-1).mean(0)
    return [q for q, r in zip(question, relevance) if r > relevance.mean()]


def naive_sparse(reference_models, embeds, visual, raters, schedule, fixed=None, recycle=False):
    """Batch 1. At each pruning layer: run the eager layer on the current tokens with
    output_attentions=True, average the raters' rows over heads and raters, keep the top-k
    of the visual pool; then that layer and the later ones run on the kept tokens only.

    With `recycle`: the best ceil(0.3 * pruned) pruned tokens are candidates, the best
    min(candidates, ceil(k / 10)) of them centres; each candidate joins its most
    cosine-similar centre (on the layer's input states) and each cluster's mean becomes a
    new token, placed right after the pool's last token with that token's position id.
    Recycled tokens join the pool of the next pruning layers.
    `fixed`: per-layer token lists to use instead of selecting (decode check).
    Returns (token list per layer, hidden states [L, D] after the last layer: a dropped
    token keeps the state it had when dropped)."""
    eager, sdpa = reference_models
    L = embeds.shape[0]
    hidden = torch.cat([embeds, embeds.new_zeros(64, embeds.shape[1])])  # room for merges
    position = list(range(L)) + [None] * 64
    active, pool, next_id = list(range(L)), set(visual), L
    per_layer = []
    with torch.inference_mode():
        for i, (e_layer, s_layer) in enumerate(zip(eager.get_model().layers, sdpa.get_model().layers)):
            if fixed is not None:
                active = fixed[i]
            elif i in schedule:
                pos = torch.tensor([position[t] for t in active])[None]
                probs = e_layer(hidden[active][None], attention_mask=causal_mask(len(active)),
                                position_ids=pos, output_attentions=True)[1][0]  # [H, n, n]
                rows = [active.index(r) for r in raters]
                scores = probs[:, rows].mean(dim=(0, 1))
                slots = [j for j, t in enumerate(active) if t in pool]
                ranked = [slots[j] for j in scores[slots].argsort(descending=True, stable=True).tolist()]
                k = min(schedule[i], len(slots))
                kept = {active[j] for j in ranked[:k]}
                merged = []
                pruned = ranked[k:]
                if recycle and pruned and k:
                    candidates = [active[j] for j in pruned[:math.ceil(0.3 * len(pruned))]]
                    centres = min(len(candidates), math.ceil(k / 10))
                    unit = torch.nn.functional.normalize(hidden[candidates], dim=-1)
                    cluster = (unit @ unit[:centres].T).argmax(dim=-1).tolist()
                    for c in range(centres):
                        members = [t for t, m in zip(candidates, cluster) if m == c]
                        hidden[next_id] = hidden[members].mean(0)
                        position[next_id] = position[active[slots[-1]]]
                        merged.append(next_id)
                        next_id += 1
                new_active = []
                for j, t in enumerate(active):
                    if t not in pool or t in kept:
                        new_active.append(t)
                    if j == slots[-1]:
                        new_active.extend(merged)
                active, pool = new_active, kept | set(merged)
            per_layer.append(list(active))
            pos = torch.tensor([position[t] for t in active])[None]
            hidden[active] = s_layer(hidden[active][None], position_ids=pos)[0][0]
    return per_layer, hidden[:L]


def lm_logits(model, hidden):
    with torch.inference_mode():
        return model.lm_head(model.get_model().norm(hidden))


def prompt_embeds(model, ids, pix, sizes):
    with torch.inference_mode():
        return model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pix, sizes)[4][0]


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("settings", [
    dict(retain_tokens=64),
    dict(keep_schedule=(200, 50, 9), pruning_layers=(1, 8, 12)),
    dict(retain_tokens=128, pruning_layers=(3,)),
])
@pytest.mark.parametrize("recycle", [False, True])
def test_selection_equals_naive_top_k_over_eager_attention(
        tiny_llava, tiny_images, reference_models, question, settings, recycle):
    tokenizer, model, image_processor = tiny_llava
    ids = image_prompt(tokenizer, question)[None]
    pix, sizes = pixels(model, image_processor, tiny_images[:1]), [tiny_images[0].size]
    config = sparsevlm_patch.enable(model, recycle=recycle, **settings).get_model()._sparsevlm_state.config
    out = forward(model, ids, images=pix, image_sizes=sizes)
    keep = sparsevlm_patch.last_keep_mask(model)[0]

    embeds = prompt_embeds(reference_models[1], ids, pix, sizes)
    L, start = embeds.shape[0], image_start(ids)
    visual = list(range(start, start + NUM_VISUAL))
    raters = naive_raters(embeds, visual, list(range(start + NUM_VISUAL, L)))
    assert 0 < len(raters) < L - start - NUM_VISUAL
    schedule = dict(zip(config.pruning_layers, config.keep_counts(NUM_VISUAL)))
    per_layer, hidden = naive_sparse(reference_models, embeds, visual, raters, schedule, recycle=recycle)

    assert sparsevlm_patch.last_stats(model)["tokens_per_layer"] == [[len(t) for t in per_layer]]
    kept = [t for t in per_layer[-1] if t < L]  # recycled tokens have no original position
    naive_keep = torch.zeros(L, dtype=torch.bool)
    naive_keep[kept] = True
    last_k = schedule[config.pruning_layers[-1]]
    if recycle:
        assert len(per_layer[-1]) > L - NUM_VISUAL + last_k
    else:
        assert len(kept) == L - NUM_VISUAL + last_k
    assert torch.equal(keep, naive_keep)
    # kept tokens ran with their original positions, on exactly the naive token sets
    assert torch.allclose(out.logits[0, kept], lm_logits(reference_models[1], hidden)[kept],
                          atol=ATOL, rtol=0)


def test_rater_scores_equal_eager_attention_probabilities(
        tiny_llava, tiny_images, reference_models, monkeypatch):
    """At the first pruning layer the rater -> token probabilities (from queries and keys)
    equal the rows of eager attention's output_attentions, in a left-padded batch."""
    tokenizer, model, image_processor = tiny_llava
    eager = reference_models[0]
    seqs = [image_prompt(tokenizer, q) for q in QUESTIONS]
    ids, mask = pad(seqs, tokenizer.pad_token_id, "left")
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    pix = pixels(model, image_processor, tiny_images)
    kwargs = dict(attention_mask=mask, position_ids=position_ids, images=pix,
                  image_sizes=[im.size for im in tiny_images])
    for m in (model, eager):
        m.config.tokenizer_padding_side = "left"

    calls = []
    real_attention, real_scores = sparse_forward.rater_attention, sparse_forward.visual_scores

    def spy_attention(query, key, rater_slot, key_valid):
        probs = real_attention(query, key, rater_slot, key_valid)
        calls.append({"probs": probs, "slots": rater_slot.clone()})
        return probs

    def spy_scores(probs, rater_weight, visual):
        scores = real_scores(probs, rater_weight, visual)
        calls[-1].update(weight=rater_weight.clone(), scores=scores)
        return scores

    def spy_top_k(scores, k, k_max):
        kept = real_top_k(scores, k, k_max)
        calls[-1].update(kept=kept)
        return kept

    real_top_k = sparse_forward.top_k_mask
    monkeypatch.setattr(sparse_forward, "rater_attention", spy_attention)
    monkeypatch.setattr(sparse_forward, "visual_scores", spy_scores)
    monkeypatch.setattr(sparse_forward, "top_k_mask", spy_top_k)
    sparsevlm_patch.enable(model, retain_tokens=64, recycle=False)
    forward(model, ids, **kwargs)
    assert len(calls) == 3  # one scoring per pruning layer
    first = calls[0]

    with torch.inference_mode():
        dense = eager(ids, output_attentions=True, **kwargs)
        relaid = eager.prepare_inputs_labels_for_multimodal(
            ids, position_ids, mask, None, None, pix, kwargs["image_sizes"])
    attentions = dense.attentions[2]  # [B, H, L, L], eager probabilities of layer 2
    embeds, valid = relaid[4], relaid[2].bool()
    B, H, L, _ = attentions.shape
    assert first["probs"].shape[:2] == (B, H) and first["probs"].shape[-1] == L
    for b in range(B):
        n = int(valid[b].sum())
        start = L - n + image_start(seqs[b][None])
        visual = list(range(start, start + NUM_VISUAL))
        raters = naive_raters(embeds[b], visual, list(range(start + NUM_VISUAL, L)))
        slots = first["slots"][b].tolist()
        weight = first["weight"][b]
        assert sorted(s for s, w in zip(slots, weight.tolist()) if w > 0) == raters
        rows = [r for r, w in enumerate(weight.tolist()) if w > 0]
        want = attentions[b][:, [slots[r] for r in rows]]  # [H, R, L]
        got = first["probs"][b][:, rows]
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        naive_scores = want[..., visual].mean(dim=(0, 1))
        assert torch.allclose(first["scores"][b, visual], naive_scores, atol=1e-6, rtol=0)
        # the first layer kept the top-k of the eager scores
        top = {visual[j] for j in naive_scores.topk(SCHEDULE_64[0]).indices.tolist()}
        assert set(torch.nonzero(first["kept"][b]).flatten().tolist()) == top
    assert torch.isinf(first["scores"][~relaid[2].bool()]).all()


# ----------------------------------------------------------------------------- batches

@pytest.mark.parametrize("recycle", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_each_sample_alone(tiny_llava, tiny_images, side, recycle):
    """Prompts of different lengths, a text-only one (with its dummy image) and one with two
    images, padded right or left: each sample gets what it gets alone."""
    from llava.constants import DEFAULT_IMAGE_TOKEN

    tokenizer, model, image_processor = tiny_llava
    seqs, pix, batch_pixels, sizes = mixed_batch(tokenizer, model, image_processor, tiny_images)
    seqs.append(image_prompt(tokenizer, DEFAULT_IMAGE_TOKEN + "\nWhich image has more shapes?"))
    batch_pixels = torch.cat([batch_pixels, pix])
    sizes = sizes + sizes[:2]
    own_images = [[0], [1], [], [0, 1]]  # the images each sample has, alone
    ids, mask = pad(seqs, tokenizer.pad_token_id, side)
    model.config.tokenizer_padding_side = side  # upstream re-pads by this
    kwargs = dict(attention_mask=mask, images=batch_pixels, image_sizes=sizes)
    if side == "left":
        # Positions counted from each sample's first token, as generate does (upstream then
        # gives each sample 0..n-1). Without them upstream itself shifts left-padded
        # samples, and its fp16-rounded RoPE table makes even dense logits differ by ~4e-3
        # from the sample alone.
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    sparsevlm_patch.enable(model, retain_tokens=64, recycle=recycle)
    batch = forward(model, ids, **kwargs)
    keep = sparsevlm_patch.last_keep_mask(model)
    stats = sparsevlm_patch.last_stats(model)
    B, L = keep.shape
    assert (B, L) == (4, len(seqs[3]) - 2 + 2 * NUM_VISUAL)
    assert stats["visual_tokens"] == [NUM_VISUAL, NUM_VISUAL, 0, 2 * NUM_VISUAL]
    assert stats["kept_visual"] == [list(SCHEDULE_64), list(SCHEDULE_64), [0, 0, 0], [132, 60, 34]]
    assert stats["image_spans"][2] == []  # the text-only sample: no visual tokens
    assert len(stats["image_spans"][3]) == 2

    for b in range(B):
        if own_images[b]:
            single = forward(model, seqs[b][None], images=pix[own_images[b]],
                             image_sizes=[sizes[i] for i in own_images[b]])
        else:
            single = forward(model, seqs[b][None])
        single_keep = sparsevlm_patch.last_keep_mask(model)[0]
        single_stats = sparsevlm_patch.last_stats(model)
        n = single.logits.shape[1]
        cols = valid_cols(side, L, n)
        assert torch.allclose(batch.logits[b, cols], single.logits[0], atol=ATOL, rtol=0), \
            (b, (batch.logits[b, cols] - single.logits[0]).abs().max())
        assert torch.equal(keep[b, cols], single_keep), b
        assert int(keep[b].sum()) == int(single_keep.sum())  # nothing kept among pads
        if not own_images[b]:  # alone, the text-only prompt runs upstream's dense forward
            assert single_keep.all() and single_stats["visual_tokens"] == [0]
        else:
            offset = cols.start
            assert stats["image_spans"][b] == [(s + offset, c) for s, c in single_stats["image_spans"][0]]
            assert stats["recycled"][b] == single_stats["recycled"][0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_is_masked_only_where_a_causal_pass_would_not_serve(tiny_llava, tiny_images, side):
    """SDPA gets no mask (its causal kernel, as upstream gets for an unpadded batch) wherever
    every sample's real tokens come first: a right-padded batch throughout, a left-padded one
    from its first pruning layer on (compaction moves the pads to the end). That the outputs
    are each sample's own is test_batch_equals_each_sample_alone."""
    tokenizer, model, image_processor = tiny_llava
    seqs, _, batch_pixels, sizes = mixed_batch(tokenizer, model, image_processor, tiny_images)
    ids, mask = pad(seqs, tokenizer.pad_token_id, side)
    model.config.tokenizer_padding_side = side
    masked = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: masked.append(kw["attention_mask"] is not None),
                                             with_kwargs=True) for layer in model.get_model().layers]
    try:
        sparsevlm_patch.enable(model, retain_tokens=64)
        forward(model, ids, attention_mask=mask, images=batch_pixels, image_sizes=sizes)
    finally:
        for hook in hooks:
            hook.remove()
    first_pruning = min(sparsevlm_patch.last_stats(model)["pruning_layers"])
    assert len(masked) == len(model.get_model().layers)
    assert masked == [side == "left" and i < first_pruning for i in range(len(masked))], masked


def test_visual_counts_come_from_the_data(tiny_llava, tiny_images):
    """Two images in one prompt (1152 visual tokens) and a visual span cut by upstream's
    truncation (288 tokens, no question left: the last visual token rates): the budget follows
    each sample's own count (per 576 tokens above 576, counted in its own tokens below)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

    tokenizer, model, image_processor = tiny_llava
    pix = pixels(model, image_processor, tiny_images)
    sizes = [im.size for im in tiny_images]
    sparsevlm_patch.enable(model, retain_tokens=64, recycle=False)
    ids = image_prompt(tokenizer, DEFAULT_IMAGE_TOKEN + "\nCompare the two images.")[None]
    out = forward(model, ids, images=pix, image_sizes=sizes)
    stats, keep = sparsevlm_patch.last_stats(model), sparsevlm_patch.last_keep_mask(model)
    places = torch.nonzero(ids[0] == IMAGE_TOKEN_INDEX).flatten().tolist()
    assert len(places) == 2
    spans = [(p + k * (NUM_VISUAL - 1), NUM_VISUAL) for k, p in enumerate(places)]
    assert stats["visual_tokens"] == [2 * NUM_VISUAL]
    assert stats["image_spans"] == [spans]
    assert stats["kept_visual"] == [[132, 60, 34]]
    visual = torch.zeros(keep.shape[1], dtype=torch.bool)
    for start, count in spans:
        visual[start:start + count] = True
    assert keep[0, ~visual].all() and int(keep[0, visual].sum()) == 34
    assert torch.isfinite(out.logits).all()

    ids = image_prompt(tokenizer, QUESTIONS[0])[None]
    start = image_start(ids)
    model.config.tokenizer_model_max_length = start + 288
    out = forward(model, ids, images=pix[:1], image_sizes=sizes[:1])
    stats, keep = sparsevlm_patch.last_stats(model), sparsevlm_patch.last_keep_mask(model)
    assert out.logits.shape[1] == start + 288
    assert stats["visual_tokens"] == [288] and stats["kept_visual"] == [[152, 55, 18]]
    assert keep[0, :start].all() and int(keep[0, start:].sum()) == 18
    assert torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------- generation

def test_generation_prunes_the_kv_cache(tiny_llava, tiny_images):
    tokenizer, model, image_processor = tiny_llava
    ids = image_prompt(tokenizer, QUESTIONS[0])[None]
    sparsevlm_patch.enable(model, retain_tokens=64)
    with torch.inference_mode():
        out = model.generate(ids, images=pixels(model, image_processor, tiny_images[:1]),
                             image_sizes=[tiny_images[0].size], max_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
    cache = out.past_key_values
    assert isinstance(cache, PrunedCache)
    steps = len(out.scores) - 1  # the last generated token is never fed back
    assert steps == 4
    stats = sparsevlm_patch.last_stats(model)  # of the prefill; decode steps keep it
    per_layer = stats["tokens_per_layer"][0]
    L = ids.shape[1] - 1 + NUM_VISUAL
    text = L - NUM_VISUAL
    lengths = [cache[i][0].shape[2] for i in range(len(cache))]
    assert lengths == [n + steps for n in per_layer]
    assert lengths[0] == L + steps  # layer 0 holds everything: generation reads it
    assert lengths[-1] == text + SCHEDULE_64[2] + stats["recycled"][0][2] + steps
    assert lengths[-1] < L // 5
    assert all(cache[i][1].shape[2] == lengths[i] for i in range(len(cache)))


def test_decode_attends_to_exactly_the_kept_tokens(tiny_llava, tiny_images, reference_models):
    """Each decode step's logits equal a naive forward where layer i sees the tokens it kept
    in the prefill plus the new ones (recycling off, batch 1)."""
    tokenizer, model, image_processor = tiny_llava
    ids = image_prompt(tokenizer, QUESTIONS[1])[None]
    pix, sizes = pixels(model, image_processor, tiny_images[1:]), [tiny_images[1].size]
    sparsevlm_patch.enable(model, retain_tokens=64, recycle=False)
    with torch.inference_mode():
        out = model.generate(ids, images=pix, image_sizes=sizes, max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
    new_tokens = out.sequences[0, 1:]  # after the BOS that generate puts first
    assert len(new_tokens) == 4

    sdpa = reference_models[1]
    embeds = prompt_embeds(sdpa, ids, pix, sizes)
    L, start = embeds.shape[0], image_start(ids)
    visual = list(range(start, start + NUM_VISUAL))
    raters = naive_raters(embeds, visual, list(range(start + NUM_VISUAL, L)))
    per_layer, hidden = naive_sparse(reference_models, embeds, visual, raters,
                                     dict(zip((2, 6, 15), SCHEDULE_64)))
    assert torch.allclose(out.scores[0][0], lm_logits(sdpa, hidden)[-1], atol=ATOL, rtol=0)
    with torch.inference_mode():
        extended = torch.cat([embeds, sdpa.get_model().embed_tokens(new_tokens[:-1])])
    new = list(range(L, L + len(new_tokens) - 1))
    _, hidden = naive_sparse(reference_models, extended, visual, raters, {},
                             fixed=[tokens + new for tokens in per_layer])
    naive = lm_logits(sdpa, hidden)[L:]
    for step in range(1, len(new_tokens)):
        assert torch.allclose(out.scores[step][0], naive[step - 1], atol=ATOL, rtol=0), step


def test_generate_left_padded_batch_equals_each_sample_alone(tiny_llava, tiny_images):
    tokenizer, model, image_processor = tiny_llava
    seqs, pix, batch_pixels, sizes = mixed_batch(tokenizer, model, image_processor, tiny_images)
    ids, mask = pad(seqs, tokenizer.pad_token_id, "left")
    model.config.tokenizer_padding_side = "left"
    sparsevlm_patch.enable(model, retain_tokens=64)
    settings = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.inference_mode():
        batch = model.generate(ids, attention_mask=mask, images=batch_pixels, image_sizes=sizes,
                               **settings)
    assert isinstance(batch.past_key_values, PrunedCache)
    stats = sparsevlm_patch.last_stats(model)
    assert stats["kept_visual"] == [list(SCHEDULE_64), list(SCHEDULE_64), [0, 0, 0]]
    for b in range(3):
        with torch.inference_mode():
            kwargs = dict(images=pix[b:b + 1], image_sizes=sizes[b:b + 1]) if b < 2 else {}
            single = model.generate(seqs[b][None], **kwargs, **settings)
        assert torch.equal(batch.sequences[b], single.sequences[0]), b
        for step, (got, want) in enumerate(zip(batch.scores, single.scores)):
            assert torch.allclose(got[b], want[0], atol=ATOL, rtol=0), (b, step)


def tiny_plain_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4,
                                         max_position_embeddings=512, pad_token_id=0))
    return model.eval()


def plain_outputs(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding
    ids[0, :9] = 0
    with torch.inference_mode():
        logits = model(ids, attention_mask=mask).logits
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    return {"logits": logits, "hidden": torch.stack(hidden), "generated": generated}


def test_plain_llama_in_the_same_process_is_untouched(tiny_llava, tiny_images):
    tokenizer, model, image_processor = tiny_llava
    sparsevlm_patch.enable(model, retain_tokens=64)
    plain = tiny_plain_llama()
    # a LLaVA model prunes in the same process, before and between the plain model's calls
    forward(model, image_prompt(tokenizer, QUESTIONS[0])[None],
            images=pixels(model, image_processor, tiny_images[:1]), image_sizes=[tiny_images[0].size])
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [list(SCHEDULE_64)]
    installed = plain_outputs(plain)
    assert "_sparsevlm_state" not in plain.model.__dict__
    assert sparsevlm_patch.last_keep_mask(plain) is None
    try:
        sparsevlm_patch.remove()
        removed = plain_outputs(plain)
    finally:
        sparsevlm_patch.apply()
    assert_bit_identical(installed, removed)


def test_enable_on_a_plain_llama_warns_and_runs_upstream():
    plain = tiny_plain_llama()
    before = plain_outputs(plain)
    with pytest.warns(UserWarning, match="LlamaForCausalLM is not a LLaVA model"):
        sparsevlm_patch.enable(plain, retain_tokens=64, pruning_layers=(1, 2))
    assert_bit_identical(before, plain_outputs(plain))


# ----------------------------------------------------------------------------- labels

@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [2048, 300])
def test_labels_and_layout_outputs_equal_upstream(tiny_llava, tiny_images, with_labels, with_mask,
                                                  side, max_length):
    """prepare_inputs_labels_for_multimodal through the hook returns exactly upstream's
    outputs (labels included), padded or not, truncated or not."""
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.model.llava_arch import LlavaMetaForCausalLM

    tokenizer, model, image_processor = tiny_llava
    seqs, pix, batch_pixels, sizes = mixed_batch(tokenizer, model, image_processor, tiny_images)
    answers = [tokenizer(" It is red.", add_special_tokens=False).input_ids,
               tokenizer(" Two.", add_special_tokens=False).input_ids,
               tokenizer(" A round red shape.", add_special_tokens=False).input_ids]
    if with_mask:
        full = [torch.cat([s, torch.tensor(a + [tokenizer.eos_token_id])]) for s, a in zip(seqs, answers)]
        ids, mask = pad(full, tokenizer.pad_token_id, side)
    else:  # no mask: same-length samples (upstream would treat pads as tokens)
        full = [torch.cat([seqs[0], torch.tensor(answers[0])])] * 2
        ids, mask, batch_pixels, sizes = torch.stack(full), None, pix, sizes[:2]
    labels = None
    if with_labels:
        # every text token of a sample gets its own label value, so any misplacement shows
        labels = (torch.arange(ids.shape[1])[None] + 37 * torch.arange(ids.shape[0])[:, None]) % 997 + 1
        labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
        if mask is not None:
            labels[mask == 0] = IGNORE_INDEX
        labels[:, :3] = IGNORE_INDEX
    model.config.tokenizer_padding_side = side
    model.config.tokenizer_model_max_length = max_length
    sparsevlm_patch.enable(model, retain_tokens=64)
    original = LlavaMetaForCausalLM.__dict__["prepare_inputs_labels_for_multimodal"].__wrapped__
    with torch.inference_mode():
        want = original(model, ids, None, mask, None, labels, batch_pixels, sizes)
        got = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, batch_pixels, sizes)
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g.dtype == w.dtype and torch.equal(g, w)
    if max_length == 300:
        assert want[4].shape[1] == 300
    # and the forward that follows runs sparse on it
    with torch.inference_mode():
        out = model(ids, attention_mask=mask, images=batch_pixels, image_sizes=sizes, labels=labels)
    assert sparsevlm_patch.last_stats(model) is not None
    assert (out.loss is not None) == with_labels
    assert torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------- misc

def test_keep_mask_for_a_text_only_prompt(tiny_llava, tiny_images, monkeypatch):
    tokenizer, model, image_processor = tiny_llava
    for name in list(os.environ):
        if name.startswith("SPARSEVLM"):
            monkeypatch.delenv(name)
    sparsevlm_patch.apply()  # installed even when the suite runs under SPARSEVLM=0
    seqs = [text_prompt(tokenizer, TEXT_QUESTION), text_prompt(tokenizer, "Hi.")]
    # A model configured by the environment (never enabled), whose first call is a
    # text-only generate (upstream skips the multimodal code): all valid tokens kept.
    ids, mask = pad(seqs, tokenizer.pad_token_id, "left")
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    keep = sparsevlm_patch.last_keep_mask(model)
    assert keep is not None and torch.equal(keep, mask.bool())

    sparsevlm_patch.enable(model, retain_tokens=64)
    forward(model, image_prompt(tokenizer, QUESTIONS[0])[None],
            images=pixels(model, image_processor, tiny_images[:1]), image_sizes=[tiny_images[0].size])
    assert not sparsevlm_patch.last_keep_mask(model).all()
    ids, mask = pad(seqs, tokenizer.pad_token_id, "right")
    forward(model, ids, attention_mask=mask)
    keep = sparsevlm_patch.last_keep_mask(model)
    assert keep.dtype == torch.bool and torch.equal(keep, mask.bool())
    stats = sparsevlm_patch.last_stats(model)
    assert stats["visual_tokens"] == [0, 0] and stats["image_spans"] == [[], []]
    assert stats["kept_visual"] == [[0, 0, 0]] * 2 and stats["recycled"] == [[0, 0, 0]] * 2
    lengths = mask.sum(1).tolist()
    assert stats["tokens_per_layer"] == [[n] * 16 for n in lengths]
    assert stats["flops"]["ratio"] == 1.0 and stats["flops"]["sparse"] == stats["flops"]["dense"] > 0
    forward(model, seqs[1][None])
    keep = sparsevlm_patch.last_keep_mask(model)
    assert keep.shape == (1, len(seqs[1])) and keep.all()


def test_output_attentions_on_an_enabled_model_raises(tiny_llava, tiny_images):
    tokenizer, model, image_processor = tiny_llava
    ids = image_prompt(tokenizer, QUESTIONS[0])[None]
    kwargs = dict(images=pixels(model, image_processor, tiny_images[:1]), image_sizes=[tiny_images[0].size])
    sparsevlm_patch.enable(model, retain_tokens=64)
    with pytest.raises(ValueError, match="output_attentions") as excinfo:
        forward(model, ids, output_attentions=True, **kwargs)
    assert "disable" in str(excinfo.value)
    sparsevlm_patch.disable(model)
    out = forward(model, ids, output_attentions=True, **kwargs)
    assert len(out.attentions) == 16
