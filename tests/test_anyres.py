"""LLaVA-1.6 anyres: visual token counts come from the data (image size, grid, unpadding,
newline tokens), not from 576; presets scale to each sample's own count."""
import pytest
import torch
from llava.mm_utils import process_images

import sparsevlm_patch
from sparsevlm_patch.config import PRESET_SCHEDULES
from sparsevlm_patch.tiny import prompt_ids


@pytest.fixture
def anyres_llava(tiny_llava):
    """The tiny model configured as LLaVA-1.6 (anyres grids, spatial_unpad with newline tokens)."""
    tokenizer, model, processor = tiny_llava
    model.config.image_aspect_ratio = "anyres"
    model.config.mm_patch_merge_type = "spatial_unpad"
    model.config.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672]]
    torch.manual_seed(0)
    model.get_model().image_newline = torch.nn.Parameter(torch.randn(model.config.hidden_size))
    return tokenizer, model, processor


def run(model, tokenizer, processor, images, question):
    prompts = [prompt_ids(tokenizer, question) for _ in images]
    ids = torch.stack(prompts)
    pixels = process_images(images, processor, model.config)
    sizes = [image.size for image in images]
    with torch.no_grad():
        logits = model(ids, images=pixels, image_sizes=sizes).logits
    return logits, sparsevlm_patch.last_stats(model), sparsevlm_patch.last_keep_mask(model)


def test_anyres_counts_come_from_the_data(anyres_llava, tiny_images):
    tokenizer, model, processor = anyres_llava
    wide = tiny_images[0].resize((600, 300))
    tall = tiny_images[1].resize((300, 600))
    sparsevlm_patch.enable(model, retain_tokens=64, recycle=False)
    question = "What color is the shape in the top-left?"
    _, stats_wide, _ = run(model, tokenizer, processor, [wide], question)
    _, stats_tall, _ = run(model, tokenizer, processor, [tall], question)
    assert stats_wide["visual_tokens"] != stats_tall["visual_tokens"]  # e.g. 1752 vs 1776
    for stats in (stats_wide, stats_tall):
        visual = stats["visual_tokens"][0]
        assert visual > 576  # base image + unpadded grid + one newline token per row
        scale = visual / 576
        assert stats["kept_visual"][0] == [min(visual, round(k * scale)) for k in PRESET_SCHEDULES[64]]
    # Upstream's own splice is the reference for the count: the plugin's layout matches it.
    sparsevlm_patch.disable(model)
    pixels = process_images([wide], processor, model.config)
    ids = prompt_ids(tokenizer, question)[None]
    with torch.no_grad():
        embeds = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixels, [wide.size])[4]
    assert embeds.shape[1] == ids.shape[1] - 1 + stats_wide["visual_tokens"][0]


def test_anyres_batch_equals_samples_alone(anyres_llava, tiny_images):
    tokenizer, model, processor = anyres_llava
    model.config.tokenizer_padding_side = "right"
    images = [tiny_images[0].resize((600, 300)), tiny_images[1].resize((300, 600))]
    sparsevlm_patch.enable(model, retain_tokens=64)
    question = "Is there a triangle in the bottom row?"
    batch_logits, batch_stats, batch_keep = run(model, tokenizer, processor, images, question)
    for b, image in enumerate(images):
        logits, stats, keep = run(model, tokenizer, processor, [image], question)
        n = keep.shape[1]
        assert batch_stats["kept_visual"][b] == stats["kept_visual"][0]
        assert torch.equal(batch_keep[b, :n], keep[0]) and not batch_keep[b, n:].any()
        torch.testing.assert_close(batch_logits[b, :n][keep[0]], logits[0][keep[0]], atol=2e-4, rtol=2e-4)
