"""The fast path (`cuda_graphs=True`) on CPU: its fixed-shape code (bucketed prefill, static
pruned-cache decode) runs eagerly here and must equal the dynamic path: same greedy tokens,
same keep masks, logits within fp32 tolerance. The capture itself needs a GPU: CPU tests
can't run it; benchmarks/bench_fast.py checks replay against eager on the GPU."""
import warnings

import pytest
import torch
from llava.mm_utils import process_images

import sparsevlm_patch
from sparsevlm_patch.fastpath import StaticPrunedCache
from sparsevlm_patch.sparse_forward import PrunedCache
from sparsevlm_patch.tiny import prompt_ids

ATOL = 1e-4
QUESTIONS = ("What color is the shape in the top-left?",
             "How many shapes are in the image? Answer with one word, please.",
             "Which shape is red?")


def left_padded(tokenizer, questions):
    seqs = [prompt_ids(tokenizer, q) for q in questions]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):], mask[b, length - len(s):] = s, 1
    return ids, mask


def generate(model, ids, pixels, sizes, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, images=pixels, image_sizes=sizes, max_new_tokens=6, do_sample=False,
                              return_dict_in_generate=True, output_scores=True, **kwargs)


def both_paths(model, run, **settings):
    """(dynamic, fast) results of `run()` with the same configuration."""
    results = []
    for graphs in (False, True):
        sparsevlm_patch.enable(model, cuda_graphs=graphs, **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run()
        results.append((out, sparsevlm_patch.last_keep_mask(model).clone(), sparsevlm_patch.last_stats(model)))
    return results


def assert_same_generation(dynamic, fast):
    assert torch.equal(dynamic.sequences, fast.sequences)
    for a, b in zip(dynamic.scores, fast.scores):
        assert torch.allclose(a, b, atol=ATOL, rtol=0), (a - b).abs().max()


def one_prompt(tiny_llava, tiny_images):
    """The model, the first question's ids (batch 1) and its image's pixels."""
    tokenizer, model, processor = tiny_llava
    return model, prompt_ids(tokenizer, QUESTIONS[0])[None], process_images(tiny_images[:1], processor, model.config)


@pytest.mark.parametrize("selection", ["sparsevlm", "sparsevlm_v2"])
def test_generate_batch_1_equals_the_dynamic_path(tiny_llava, tiny_images, selection):
    model, ids, pixels = one_prompt(tiny_llava, tiny_images)
    (dyn, dyn_keep, dyn_stats), (fast, fast_keep, fast_stats) = both_paths(
        model, lambda: generate(model, ids, pixels, [tiny_images[0].size]), retain_tokens=64, selection=selection)
    assert_same_generation(dyn, fast)
    assert torch.equal(dyn_keep, fast_keep)
    assert fast_stats["kept_visual"] == dyn_stats["kept_visual"]
    assert fast_stats["fast_path"]["path"] == "fixed-shape, eager"  # no capture on a CPU
    assert isinstance(fast.past_key_values, StaticPrunedCache)


def test_a_bucket_of_one_prompt_runs_the_causal_kernel_unmasked(tiny_llava, tiny_images):
    """The bucket's pad slots follow the prompt, so its prefill needs no attention mask (the one
    upstream gives an unpadded prompt, whose SDPA kernel is causal flash on a GPU); its decode
    steps do, as the bucket's pads sit in the cache."""
    model, ids, pixels = one_prompt(tiny_llava, tiny_images)
    masks = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: masks.append(kw["attention_mask"]), with_kwargs=True)
             for layer in model.get_model().layers]
    try:
        sparsevlm_patch.enable(model, retain_tokens=64, cuda_graphs=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generate(model, ids, pixels, [tiny_images[0].size])
    finally:
        for hook in hooks:
            hook.remove()
    layers = len(model.get_model().layers)
    assert len(masks) > layers and all(m is None for m in masks[:layers])
    assert all(m is not None for m in masks[layers:])


def test_left_padded_batch_of_different_lengths_in_one_bucket(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    model.config.tokenizer_padding_side = "left"
    ids, mask = left_padded(tokenizer, QUESTIONS[:2])
    pixels = process_images(tiny_images, processor, model.config)
    sizes = [image.size for image in tiny_images]
    (dyn, dyn_keep, _), (fast, fast_keep, _) = both_paths(
        model, lambda: generate(model, ids, pixels, sizes, attention_mask=mask), retain_tokens=64)
    assert_same_generation(dyn, fast)
    assert torch.equal(dyn_keep, fast_keep)


def test_prompts_of_one_bucket_share_one_shape(tiny_llava, tiny_images):
    """An eval loop over questions of different lengths: one prefill shape per bucket, not
    one per prompt."""
    tokenizer, model, processor = tiny_llava
    pixels = process_images(tiny_images[:1], processor, model.config)
    sparsevlm_patch.enable(model, retain_tokens=64, cuda_graphs=True)
    lengths, shapes = set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for question in QUESTIONS:
            ids = prompt_ids(tokenizer, question)[None]
            lengths.add(ids.shape[1])
            generate(model, ids, pixels, [tiny_images[0].size])
            shapes.add(sparsevlm_patch.last_stats(model)["fast_path"]["prefill_shapes"])
    assert len(lengths) == 3 and shapes == {1}


def test_sampling_runs_on_the_static_cache_with_the_preset_counts(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids = prompt_ids(tokenizer, QUESTIONS[1])[None]
    pixels = process_images(tiny_images[:1], processor, model.config)
    sparsevlm_patch.enable(model, retain_tokens=64, cuda_graphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode():
            out = model.generate(ids.repeat(2, 1), images=pixels.repeat(2, 1, 1, 1),
                                 image_sizes=[tiny_images[0].size] * 2, do_sample=True, temperature=0.2,
                                 max_new_tokens=5, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, StaticPrunedCache)
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [[66, 30, 17]] * 2


def test_a_finished_generations_static_cache_is_refused_clearly(tiny_llava, tiny_images):
    model, ids, pixels = one_prompt(tiny_llava, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64, cuda_graphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = generate(model, ids, pixels, [tiny_images[0].size])
    mask = torch.ones(1, out.past_key_values.length + 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="cuda_graphs off"):
        with torch.inference_mode():
            model(out.sequences[:, -1:], past_key_values=out.past_key_values, attention_mask=mask)


def test_a_forward_outside_generate_returns_a_cache_it_owns(tiny_llava, tiny_images):
    """model(...) with use_cache (no new-token budget known): the bucketed prefill's cache is
    copied out of the graph's buffers and trimmed to the prompt; continuations equal the
    dynamic path's."""
    tokenizer, model, processor = tiny_llava
    ids = prompt_ids(tokenizer, QUESTIONS[2])[None]
    pixels = process_images(tiny_images[:1], processor, model.config)
    nxt = tokenizer("red", add_special_tokens=False, return_tensors="pt").input_ids

    def run():
        with torch.inference_mode():
            first = model(ids, images=pixels, image_sizes=[tiny_images[0].size], use_cache=True)
            cache = first.past_key_values
            assert isinstance(cache, PrunedCache) and cache.get_seq_length(0) == first.logits.shape[1]
            mask = torch.ones(1, cache.get_seq_length(0) + nxt.shape[1], dtype=torch.long)
            return first.logits, model(nxt, past_key_values=cache, attention_mask=mask).logits

    (dyn, dyn_keep, _), (fast, fast_keep, _) = both_paths(model, run, retain_tokens=64)
    assert torch.equal(dyn_keep, fast_keep)
    for a, b in zip(dyn, fast):
        assert torch.allclose(a, b, atol=ATOL, rtol=0)


def test_beam_search_falls_back_with_a_warning_and_equals_the_dynamic_path(tiny_llava, tiny_images):
    model, ids, pixels = one_prompt(tiny_llava, tiny_images)
    (dyn, _, _), (fast, _, _) = both_paths(
        model, lambda: generate(model, ids, pixels, [tiny_images[0].size], num_beams=2), retain_tokens=64)
    assert torch.equal(dyn.sequences, fast.sequences)
    assert isinstance(fast.past_key_values, PrunedCache)
    sparsevlm_patch.fastpath._warned.clear()
    with pytest.warns(UserWarning, match="beam search"):
        generate(model, ids, pixels, [tiny_images[0].size], num_beams=2)


def test_training_takes_the_dynamic_path(tiny_llava, tiny_images):
    model, ids, pixels = one_prompt(tiny_llava, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64, cuda_graphs=True)
    sparsevlm_patch.fastpath._warned.clear()
    with pytest.warns(UserWarning, match="gradients enabled"):
        out = model(ids, images=pixels, image_sizes=[tiny_images[0].size])
    assert "fast_path" not in sparsevlm_patch.last_stats(model)
    out.logits.sum().backward()  # a real graph for autograd, not a replay


def test_nothing_pruned_runs_dense_on_the_fast_path(tiny_llava, tiny_images):
    """A budget covering every visual token with cuda_graphs: dense layers on the fixed-shape
    path (what 'dense with the same capture' measures), equal to upstream."""
    model, ids, pixels = one_prompt(tiny_llava, tiny_images)
    sparsevlm_patch.disable(model)
    upstream = generate(model, ids, pixels, [tiny_images[0].size])
    sparsevlm_patch.enable(model, keep_schedule=(576, 576, 576), cuda_graphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = generate(model, ids, pixels, [tiny_images[0].size])
    stats = sparsevlm_patch.last_stats(model)
    assert "fast_path" in stats and stats["flops"]["ratio"] == 1.0
    assert sparsevlm_patch.last_keep_mask(model).all()
    assert_same_generation(upstream, fast)


def test_static_buffers_serve_inference_mode_and_no_grad_alike(tiny_llava, tiny_images):
    """Upstream's eval scripts run under inference_mode, its chat under no_grad: buffers made
    under one are written in place under the other."""
    model, ids, pixels = one_prompt(tiny_llava, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64, cuda_graphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = generate(model, ids, pixels, [tiny_images[0].size])
        with torch.no_grad():
            again = model.generate(ids, images=pixels, image_sizes=[tiny_images[0].size], max_new_tokens=6,
                                   do_sample=False)
    assert torch.equal(first.sequences, again)
