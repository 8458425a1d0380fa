"""Generation modes beyond greedy: beams and several sequences per prompt prune too; a mode
that rebuilds the pruned cache is refused with a clear error."""
import pytest
import torch
from llava.mm_utils import process_images

import sparsevlm_patch
from sparsevlm_patch.sparse_forward import PrunedCache
from sparsevlm_patch.tiny import prompt_ids


def inputs(tokenizer, model, processor, images, question="What color is the shape in the top-left?"):
    ids = prompt_ids(tokenizer, question)[None]
    return ids, process_images(images[:1], processor, model.config), [images[0].size]


def test_beam_search_prunes_every_beam(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    out = model.generate(ids, images=pixels, image_sizes=sizes, num_beams=3, max_new_tokens=4,
                         do_sample=False, return_dict_in_generate=True)
    stats = sparsevlm_patch.last_stats(model)
    assert stats["kept_visual"] == [[66, 30, 17]] * 3
    assert isinstance(out.past_key_values, PrunedCache)
    assert out.past_key_values[15][0].shape[-2] < out.past_key_values[0][0].shape[-2]
    # The beams of a batch of two equal prompts are those of the prompt alone.
    pair = model.generate(ids.repeat(2, 1), images=pixels.repeat(2, 1, 1, 1), image_sizes=sizes * 2,
                          num_beams=3, max_new_tokens=4, do_sample=False)
    assert torch.equal(pair[0], out.sequences[0]) and torch.equal(pair[1], out.sequences[0])


def test_several_sequences_per_prompt_prune(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    torch.manual_seed(0)
    model.generate(ids, images=pixels, image_sizes=sizes, do_sample=True, num_return_sequences=2,
                   max_new_tokens=3)
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [[66, 30, 17]] * 2


def test_contrastive_search_over_a_pruned_cache_is_refused(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids, pixels, sizes = inputs(tokenizer, model, processor, tiny_images)
    sparsevlm_patch.enable(model, retain_tokens=64)
    with pytest.raises(ValueError, match="rebuilt the pruned KV cache"):
        model.generate(ids, images=pixels, image_sizes=sizes, penalty_alpha=0.6, top_k=4, max_new_tokens=3)
    sparsevlm_patch.disable(model)
    model.generate(ids, images=pixels, image_sizes=sizes, penalty_alpha=0.6, top_k=4, max_new_tokens=3)
