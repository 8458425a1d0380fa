"""Selection rules (`enable(..., selection=...)`): each equals a naive implementation over
upstream's eager attention, the rules choose different tokens, a batch equals its samples
alone, presets and errors."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import sparsevlm_patch
from sparsevlm_patch.config import PRESET_SCHEDULES, PRESET_SCHEDULES_V2, make_config
from test_inference import (NUM_VISUAL, QUESTIONS, forward, image_prompt, image_start, naive_raters, pad, pixels,
                            prompt_embeds, valid_cols)

RULES = ("sparsevlm", "sparsevlm_v2", "fastv", "random")
K = 66  # visual tokens kept at the one pruning layer
LAYER = 2
ATOL = 2e-5


@pytest.fixture(scope="module")
def eager_model(tiny_llava_dir):
    """The tiny LLaVA with eager attention (probabilities), plugin disabled."""
    from llava.model.builder import load_pretrained_model

    _, model, _, _ = load_pretrained_model(tiny_llava_dir, None, "tiny-llava-v1", device="cpu",
                                           device_map="cpu", attn_implementation="eager")
    model.float().eval()
    return sparsevlm_patch.disable(model)


def plugin_kept(model, ids, pix, sizes, rule, seed=0):
    """Visual tokens (offsets in the image) the plugin keeps at one pruning layer."""
    sparsevlm_patch.enable(model, keep_schedule=(K,), pruning_layers=(LAYER,), recycle=False, selection=rule,
                           seed=seed)
    forward(model, ids, images=pix, image_sizes=sizes)
    stats = sparsevlm_patch.last_stats(model)
    assert stats["selection"] == rule and stats["kept_visual"] == [[K]]
    start = image_start(ids)
    keep = sparsevlm_patch.last_keep_mask(model)[0, start:start + NUM_VISUAL]
    return set(torch.nonzero(keep).flatten().tolist())


def naive_kept(eager, ids, pix, sizes, rule):
    """The rule written out on eager attention probabilities of layer LAYER (dense before it)."""
    embeds = prompt_embeds(eager, ids, pix, sizes)
    L, start = embeds.shape[0], image_start(ids)
    visual = list(range(start, start + NUM_VISUAL))
    with torch.inference_mode():
        probs = eager.get_model()(inputs_embeds=embeds[None], output_attentions=True).attentions[LAYER][0]
    H = probs.shape[0]
    if rule == "fastv":
        rows = [L - 1]  # the last prompt token
    else:
        rows = naive_raters(embeds, visual, list(range(start + NUM_VISUAL, L)))
    attn = probs[:, rows][:, :, visual]  # [H, R, V]
    if rule == "sparsevlm_v2":
        layer = eager.get_model().layers[LAYER].self_attn
        ones = torch.ones(1, 1, L, layer.head_dim)
        cos, sin = layer.rotary_emb(ones, seq_len=L)
        q, k = apply_rotary_pos_emb(ones, ones, cos, sin, torch.arange(L)[None])
        gravity = (q @ k.transpose(-1, -2))[0, 0] / layer.head_dim ** 0.5  # [L, L]
        attn = attn / gravity[rows][:, visual]
        heads = attn.sum(dim=(1, 2)).topk(max(1, round(H * 14 / 32))).indices
        attn = attn[heads]
    scores = attn.mean(dim=(0, 1))
    return set(scores.topk(K).indices.tolist())


def test_each_rule_equals_its_naive_selection_and_the_rules_differ(tiny_llava, tiny_images, eager_model):
    tokenizer, model, processor = tiny_llava
    ids = image_prompt(tokenizer, QUESTIONS[1])[None]
    pix, sizes = pixels(model, processor, tiny_images[:1]), [tiny_images[0].size]
    chosen = {}
    for rule in RULES:
        chosen[rule] = plugin_kept(model, ids, pix, sizes, rule)
        assert len(chosen[rule]) == K
        if rule != "random":
            overlap = len(chosen[rule] & naive_kept(eager_model, ids, pix, sizes, rule))
            assert overlap >= 63, (rule, overlap)
    for i, a in enumerate(RULES):
        for b in RULES[i + 1:]:
            assert len(chosen[a] & chosen[b]) <= 60, (a, b, len(chosen[a] & chosen[b]))


def test_random_is_seeded_and_spreads_over_the_image(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids = image_prompt(tokenizer, QUESTIONS[0])[None]
    pix, sizes = pixels(model, processor, tiny_images[:1]), [tiny_images[0].size]
    first = plugin_kept(model, ids, pix, sizes, "random", seed=0)
    assert plugin_kept(model, ids, pix, sizes, "random", seed=0) == first
    other = plugin_kept(model, ids, pix, sizes, "random", seed=1)
    assert other != first and len(other & first) < 30  # expected overlap 66 * 66 / 576 = 7.6
    thirds = [sum(1 for v in first if v // 192 == t) for t in range(3)]
    assert min(thirds) >= 8, thirds  # not bunched in one part of the image


@pytest.mark.parametrize("rule", RULES[1:])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_each_sample_alone_for_every_rule(tiny_llava, tiny_images, side, rule):
    tokenizer, model, processor = tiny_llava
    seqs = [image_prompt(tokenizer, q) for q in QUESTIONS]
    pix = pixels(model, processor, tiny_images)
    sizes = [image.size for image in tiny_images]
    ids, mask = pad(seqs, tokenizer.pad_token_id, side)
    model.config.tokenizer_padding_side = side
    kwargs = dict(attention_mask=mask, images=pix, image_sizes=sizes)
    if side == "left":
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    sparsevlm_patch.enable(model, retain_tokens=64, selection=rule)
    batch = forward(model, ids, **kwargs)
    keep = sparsevlm_patch.last_keep_mask(model)
    presets = PRESET_SCHEDULES_V2 if rule == "sparsevlm_v2" else PRESET_SCHEDULES
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [list(presets[64])] * 2
    for b in range(2):
        single = forward(model, seqs[b][None], images=pix[b:b + 1], image_sizes=sizes[b:b + 1])
        cols = valid_cols(side, keep.shape[1], single.logits.shape[1])
        assert torch.equal(keep[b, cols], sparsevlm_patch.last_keep_mask(model)[0]), b
        assert torch.allclose(batch.logits[b, cols], single.logits[0], atol=ATOL, rtol=0), b


@pytest.mark.parametrize("retain", [192, 128, 96, 64])
def test_every_rules_presets(retain):
    assert make_config(retain, selection="sparsevlm_v2").keep_counts(576) == PRESET_SCHEDULES_V2[retain]
    assert PRESET_SCHEDULES_V2[64] == (66, 34, 20) and PRESET_SCHEDULES_V2[128] == (238, 108, 60)
    for rule in ("sparsevlm", "fastv", "random"):
        assert make_config(retain, selection=rule).keep_counts(576) == PRESET_SCHEDULES[retain]
    # scaled per 576 tokens and interpolated by v1's rules
    assert make_config(64, selection="sparsevlm_v2").keep_counts(1152) == (132, 68, 40)
    between = make_config(80, selection="sparsevlm_v2").keep_counts(576)
    assert PRESET_SCHEDULES_V2[64] < between < PRESET_SCHEDULES_V2[96] or between[0] > 66


def test_recycling_defaults_to_the_rules_own():
    from sparsevlm_patch.config import SparseConfig

    assert make_config().recycle is True and SparseConfig().recycle is True
    assert SparseConfig(selection="fastv").recycle is False  # the config object resolves it itself
    for rule in ("sparsevlm_v2", "fastv", "random"):
        assert make_config(selection=rule).recycle is False
        assert make_config(selection=rule, recycle=True).recycle is True
    assert make_config(selection="sparsevlm", recycle="0").recycle is False


def test_bad_rule_or_seed_names_the_flag_value_and_the_allowed_names(tiny_llava):
    _, model, _ = tiny_llava
    with pytest.raises(ValueError) as excinfo:
        sparsevlm_patch.enable(model, selection="fastvv")
    message = str(excinfo.value)
    assert "selection='fastvv'" in message and all(rule in message for rule in RULES)
    with pytest.raises(ValueError, match="seed='x'"):
        sparsevlm_patch.enable(model, selection="random", seed="x")
    with pytest.raises(TypeError, match="selecton.*selection"):
        sparsevlm_patch.enable(model, selecton="fastv")
    from sparsevlm_patch.config import config_from_env

    with pytest.raises(ValueError, match="SPARSEVLM_SELECTION='v3'.*sparsevlm_v2"):
        config_from_env({"SPARSEVLM_SELECTION": "v3"})
    assert config_from_env({"SPARSEVLM_SELECTION": "fastv", "SPARSEVLM_SEED": "7"}).seed == 7


def test_flops_count_each_rules_selection_work(tiny_llava, tiny_images):
    tokenizer, model, processor = tiny_llava
    ids = image_prompt(tokenizer, QUESTIONS[0])[None]
    pix, sizes = pixels(model, processor, tiny_images[:1]), [tiny_images[0].size]
    sparse = {}
    for rule in RULES:
        sparsevlm_patch.enable(model, retain_tokens=64, selection=rule, recycle=False)
        forward(model, ids, images=pix, image_sizes=sizes)
        sparse[rule] = sparsevlm_patch.last_stats(model)["flops"]["sparse"]
    assert sparse["random"] < sparse["fastv"] < sparse["sparsevlm"] < sparse["sparsevlm_v2"]
