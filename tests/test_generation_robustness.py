"""Generation as upstream's users run it: sampling prunes, caches behave as upstream's, no
stale or cross-thread layouts, switching the plugin off mid-generation is safe."""
import threading

import pytest
import torch
from llava.mm_utils import process_images
from transformers.cache_utils import DynamicCache

import sparsevlm_patch
from sparsevlm_patch import handoff
from sparsevlm_patch.sparse_forward import PrunedCache
from sparsevlm_patch.tiny import prompt_ids

PRESET_64 = [66, 30, 17]
QUESTIONS = ("What color is the shape in the top-left?", "Which shape is in the top-right corner?")
ATOL = 2e-5


def image_inputs(tokenizer, model, processor, images, question=QUESTIONS[0], index=0):
    ids = prompt_ids(tokenizer, question)[None]
    return ids, process_images(images[index:index + 1], processor, model.config), [images[index].size]


def greedy(model, ids, pixels, sizes, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, images=pixels, image_sizes=sizes, max_new_tokens=4, do_sample=False,
                              return_dict_in_generate=True, output_scores=True, **kwargs)


@pytest.mark.parametrize("batch", [1, 2])
def test_sampling_prunes_with_the_preset_counts(tiny_llava, tiny_images, batch, recwarn):
    """Upstream's eval default (temperature 0.2) samples: transformers copies the embeddings
    (`repeat_interleave(1)`) before the prefill, which must still prune."""
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = image_inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    torch.manual_seed(0)
    with torch.inference_mode():
        model.generate(ids.repeat(batch, 1), images=pixels.repeat(batch, 1, 1, 1), image_sizes=sizes * batch,
                       do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=3)
    stats = sparsevlm_patch.last_stats(model)
    assert stats["kept_visual"] == [PRESET_64] * batch
    assert stats["flops"]["ratio"] > 2
    assert not [w for w in recwarn if "sparsevlm" in str(w.message)]


def continuation_logits(model, cache, tokens, past_len):
    mask = torch.ones(1, past_len + tokens.shape[1], dtype=torch.long)
    with torch.inference_mode():
        return model(tokens, past_key_values=cache, attention_mask=mask, use_cache=True).logits


def test_one_prefill_serves_several_continuations(tiny_llava, tiny_images):
    """Scoring several answers from one prompt: each continuation over the same prefill cache
    equals that continuation over a fresh prefill."""
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = image_inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)

    def prefill():
        with torch.inference_mode():
            out = model(ids, images=pixels, image_sizes=sizes, use_cache=True)
        assert isinstance(out.past_key_values, PrunedCache)
        return out.past_key_values

    cache = prefill()
    past_len = cache.get_seq_length(0)
    lengths = [cache[i][0].shape[-2] for i in range(len(cache))]
    options = [tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
               for text in ("red", "a blue square", "green!")]
    assert len({o.shape[1] for o in options}) > 1
    shared = [continuation_logits(model, cache, option, past_len) for option in options]
    assert [cache[i][0].shape[-2] for i in range(len(cache))] == lengths  # the prefill's cache is unchanged
    for option, got in zip(options, shared):
        want = continuation_logits(model, prefill(), option, past_len)
        assert torch.allclose(got, want, atol=ATOL, rtol=0)
    assert not torch.allclose(shared[0][:, -1], shared[2][:, -1])  # the options really differ


def test_a_user_dynamic_cache_is_refused_clearly_for_a_pruned_prefill(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = image_inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    with pytest.raises(ValueError, match="past_key_values=None") as excinfo:
        with torch.inference_mode():
            model(ids, images=pixels, image_sizes=sizes, past_key_values=DynamicCache(), use_cache=True)
    assert "DynamicCache" in str(excinfo.value)
    # Where nothing is pruned (a text-only prompt), the user's cache is filled as upstream fills it.
    text = tokenizer("a red circle", return_tensors="pt").input_ids
    user_cache = DynamicCache()
    with torch.inference_mode():
        out = model(text, past_key_values=user_cache, use_cache=True)
    assert out.past_key_values is user_cache and user_cache.get_seq_length() == text.shape[1]


def test_a_failed_call_leaves_no_layout_behind(tiny_llava, tiny_images):
    """A generate() that fails after the splice (a mistyped keyword) must not prune a later
    text-only batch whose shape would fit its layout."""
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = image_inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    with pytest.raises(ValueError, match="mistyped_keyword"):
        with torch.inference_mode():
            model.generate(ids, images=pixels, image_sizes=sizes, max_new_tokens=2, mistyped_keyword=1)
    spliced_length = ids.shape[1] - 1 + 576
    text = torch.randint(3, len(tokenizer), (2, spliced_length), generator=torch.Generator().manual_seed(0))
    sparse = greedy(model, text, None, None)
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [[0, 0, 0]] * 2
    sparsevlm_patch.disable(model)
    dense = greedy(model, text, None, None)
    assert torch.equal(sparse.sequences, dense.sequences)
    for got, want in zip(sparse.scores, dense.scores):
        assert torch.equal(got, want)


def test_concurrent_generations_each_equal_their_solo_run(tiny_llava, tiny_images):
    """Upstream's model worker generates in threads. Thread A is held after its splice until
    thread B has spliced too; each must still prune its own image with its own layout."""
    tokenizer, model, processor = tiny_llava
    sparsevlm_patch.enable(model, retain_tokens=64)
    requests = [image_inputs(tokenizer, model, processor, tiny_images, QUESTIONS[i], index=i) for i in range(2)]
    solo = [greedy(model, *request) for request in requests]

    spliced = [threading.Event(), threading.Event()]
    held = threading.local()

    def hold_after_splice(module, args, kwargs):
        if getattr(held, "index", None) is not None and not getattr(held, "done", False):
            held.done = True  # the prefill only
            spliced[held.index].set()
            if held.index == 0:
                assert spliced[1].wait(timeout=60), "thread B never spliced"

    results, errors = [None, None], []

    def worker(i):
        held.index = i
        try:
            if i == 1:
                assert spliced[0].wait(timeout=60)
            results[i] = greedy(model, *requests[i])
        except Exception as error:  # reported below
            errors.append(error)
            spliced[i].set()

    handle = model.get_model().register_forward_pre_hook(hold_after_splice, with_kwargs=True)
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        handle.remove()
    assert not errors, errors
    for got, want in zip(results, solo):
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores):
            assert torch.allclose(a, b, atol=ATOL, rtol=0)


class _SwitchOff:
    """A streamer that runs `action` once the first new token has been streamed."""

    def __init__(self, action):
        self.action, self.calls = action, 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first put is the prompt
            self.action()

    def end(self):
        pass


def test_disable_from_a_streamer_lets_the_generation_finish_as_it_started(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = image_inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    want = greedy(model, ids, pixels, sizes)
    got = greedy(model, ids, pixels, sizes, streamer=_SwitchOff(lambda: sparsevlm_patch.disable(model)))
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        assert torch.allclose(a, b, atol=ATOL, rtol=0)
    assert sparsevlm_patch.last_stats(model) is None  # disabled now: the next call runs upstream


def test_remove_during_a_generation_fails_clearly(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = image_inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    try:
        with pytest.raises(RuntimeError, match="pruned by sparsevlm_patch") as excinfo:
            greedy(model, ids, pixels, sizes, streamer=_SwitchOff(sparsevlm_patch.remove))
        assert "apply()" in str(excinfo.value)
    finally:
        sparsevlm_patch.apply()


def test_output_attentions_in_decode_is_refused_clearly(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = image_inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    with torch.inference_mode():
        cache = model(ids, images=pixels, image_sizes=sizes, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="output_attentions") as excinfo:
            model(torch.tensor([[450]]), past_key_values=cache, use_cache=True, output_attentions=True)
    assert "disable" in str(excinfo.value)


def test_a_prefill_on_other_embeddings_in_the_call_of_a_splice_is_an_error():
    """Inside one call, a layout is taken by shape (the batch, or each sample repeated); any
    other prefill there would run dense although the call meant to prune: an error."""
    from sparsevlm_patch.layout import layout_from_probe

    model = torch.nn.Linear(1, 1)
    probe = torch.tensor([[0, -100, -100, 3]])
    layout = layout_from_probe(probe, torch.ones(1, 4, dtype=torch.bool), None)
    with handoff.call_scope():
        handoff.put(model, layout, torch.zeros(1, 4, 8))
        assert handoff.take(model, torch.zeros(3, 4, 8)).visual.shape == (3, 4)  # beams: repeated
        assert handoff.take(model, torch.zeros(1, 4, 8)) is None  # taken once
        handoff.put(model, layout, torch.zeros(1, 4, 8))
        with pytest.raises(handoff.LayoutMismatch, match=r"\[1, 4, 8\].*\[2, 5, 8\]"):
            handoff.take(model, torch.zeros(2, 5, 8))
    with handoff.call_scope():
        handoff.put(model, layout, torch.zeros(1, 4, 8))
    with handoff.call_scope():
        assert handoff.take(model, torch.zeros(1, 4, 8)) is None  # the first call's layout is gone
