"""Llama's contracts, held by every other supported family (LLaVA-1.6 Mistral, LLaVA-NeXT Qwen2):
each tiny model carries the tiny Llama's weights (test_mistral.as_mistral, test_qwen.as_qwen),
so every rule keeps exactly the tokens it keeps on Llama, which the naive-selection tests pin
down; a batch equals its samples alone; generation prunes its cache."""
import pytest
import torch
from llava.mm_utils import process_images

import sparsevlm_patch
from sparsevlm_patch.tiny import prompt_ids
from test_mistral import ATOL, QUESTIONS, as_mistral, generate, run
from test_qwen import as_qwen

# LLaVA-NeXT's splice zips a batch with `modalities` (its default, ["image"], covers one sample).
FAMILIES = {"mistral": (as_mistral, {}), "qwen": (as_qwen, {"modalities": ["image", "image"]})}


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tiny_llava, tiny_images):
    tokenizer, llama, processor = tiny_llava
    build, batch_kwargs = FAMILIES[request.param]
    pixels = process_images(tiny_images, processor, llama.config)
    return tokenizer, llama, build(llama), pixels, [image.size for image in tiny_images], batch_kwargs


def padded(tokenizer, side):
    seqs = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    length = max(len(s) for s in seqs)
    ids = torch.full((2, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[b, cols], mask[b, cols] = s, 1
    return seqs, ids, mask


@pytest.mark.parametrize("selection", ["sparsevlm", "sparsevlm_v2", "fastv", "random"])
def test_every_rule_prunes_as_it_prunes_llama(family, selection):
    tokenizer, llama, model, pixels, sizes, _ = family
    ids = prompt_ids(tokenizer, QUESTIONS[1])[None]
    kwargs = dict(images=pixels[:1], image_sizes=sizes[:1])
    results = []
    for m in (llama, model):
        sparsevlm_patch.enable(m, retain_tokens=64, selection=selection)
        logits = run(m, ids, **kwargs).logits
        results.append((logits, sparsevlm_patch.last_keep_mask(m), sparsevlm_patch.last_stats(m)))
    (llama_logits, llama_keep, llama_stats), (logits, keep, stats) = results
    assert stats["selection"] == selection
    assert stats["kept_visual"] == llama_stats["kept_visual"]
    assert stats["kept_visual"] == [[66, 34, 20] if selection == "sparsevlm_v2" else [66, 30, 17]]
    assert torch.equal(keep, llama_keep)
    assert torch.allclose(logits, llama_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_each_sample_alone(family, side):
    tokenizer, _, model, pixels, sizes, batch_kwargs = family
    seqs, ids, mask = padded(tokenizer, side)
    model.config.tokenizer_padding_side = side
    kwargs = dict(attention_mask=mask, images=pixels, image_sizes=sizes, **batch_kwargs)
    if side == "left":
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    sparsevlm_patch.enable(model, retain_tokens=64)
    batch = run(model, ids, **kwargs)
    keep = sparsevlm_patch.last_keep_mask(model)
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [[66, 30, 17]] * 2
    for b in range(2):
        single = run(model, seqs[b][None], images=pixels[b:b + 1], image_sizes=sizes[b:b + 1])
        n = single.logits.shape[1]
        cols = slice(0, n) if side == "right" else slice(keep.shape[1] - n, keep.shape[1])
        assert torch.equal(keep[b, cols], sparsevlm_patch.last_keep_mask(model)[0])
        assert torch.allclose(batch.logits[b, cols], single.logits[0], atol=ATOL, rtol=0)


def test_generation_prunes_and_a_left_padded_batch_equals_each_sample(family):
    tokenizer, _, model, pixels, sizes, batch_kwargs = family
    seqs, ids, mask = padded(tokenizer, "left")
    model.config.tokenizer_padding_side = "left"
    sparsevlm_patch.enable(model, retain_tokens=64)
    batch = generate(model, ids, pixels, sizes, attention_mask=mask, **batch_kwargs)
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [[66, 30, 17]] * 2
    cache = batch.past_key_values
    assert cache[15][0].shape[-2] < cache[0][0].shape[-2]  # the cache is pruned
    for b in range(2):
        single = generate(model, seqs[b][None], pixels[b:b + 1], sizes[b:b + 1])
        assert torch.equal(batch.sequences[b], single.sequences[0])
        for got, want in zip(batch.scores, single.scores):
            assert torch.allclose(got[b], want[0], atol=ATOL, rtol=0)
