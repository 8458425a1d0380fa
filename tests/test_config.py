"""Flags: presets, scaling, validation. Every bad value fails at configuration time with a
ValueError that names the flag, the value and what is allowed."""

import os
import subprocess
import sys

import pytest

from sparsevlm_patch.config import (
    PRESET_SCHEDULES,
    SparseConfig,
    config_from_env,
    env_enabled,
    make_config,
    recycle_counts,
    retain_schedule,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_clear(excinfo, *parts):
    """The message holds every part (flag name, offending value, what is allowed)."""
    message = str(excinfo.value)
    for part in parts:
        assert part in message, f"{part!r} missing from error message: {message!r}"


# ----------------------------------------------------------------------------- presets

def test_default_config_is_retain_64_layers_2_6_15_with_recycling():
    config = make_config()
    assert config == SparseConfig(pruning_layers=(2, 6, 15), retain_tokens=64,
                                  keep_schedule=None, recycle=True)
    assert config.keep_counts(576) == (66, 30, 17)


@pytest.mark.parametrize("retain, counts", [
    (192, (300, 200, 110)), (128, (303, 110, 36)), (96, (238, 48, 26)), (64, (66, 30, 17)),
])
def test_presets_at_576_visual_tokens(retain, counts):
    assert make_config(retain).keep_counts(576) == counts
    assert make_config(str(retain)).keep_counts(576) == counts  # as the env gives it
    assert PRESET_SCHEDULES[retain] == counts


@pytest.mark.parametrize("retain", [192, 128, 96, 64])
@pytest.mark.parametrize("visual", [577, 1152, 2880])
def test_presets_scale_with_a_visual_count_above_576(retain, visual):
    counts = make_config(retain).keep_counts(visual)
    expected = [k * visual / 576 for k in PRESET_SCHEDULES[retain]]
    assert len(counts) == 3
    for got, want in zip(counts, expected):
        assert abs(got - want) <= 0.5 + 1e-9, (counts, expected)
        assert 0 <= got <= visual
    assert list(counts) == sorted(counts, reverse=True)


@pytest.mark.parametrize("pruning_layers", [(2, 6, 15), (3, 9)])
@pytest.mark.parametrize("retain, visual", [(64, 16), (200, 100), (256, 256), (300, 256), (576, 576)])
def test_a_budget_at_or_above_the_visual_count_keeps_every_visual_token(retain, visual, pruning_layers):
    """design.md contract 2, also for towers of other than 576 tokens (the scaled preset of
    retain 200 at 100 tokens would keep 53, 36, 21)."""
    counts = make_config(retain, pruning_layers=pruning_layers).keep_counts(visual)
    assert counts == (visual,) * len(pruning_layers)


@pytest.mark.parametrize("pruning_layers", [(2, 6, 15), (3, 9)])
@pytest.mark.parametrize("visual", [16, 80, 144, 256, 575])
def test_a_small_towers_budget_counts_its_own_tokens_and_prunes_smoothly(visual, pruning_layers):
    """Fewer than 576 visual tokens: every budget below the count prunes, keep counts follow the
    budget without a jump (at most the presets' own steepest slope, 5.4 per token; the presets'
    first layer dips from 303 at 128 to 300 at 192, the last layer never falls), and the budget
    that equals the count keeps all."""
    previous = None
    for retain in range(1, visual + 1):
        counts = make_config(retain, pruning_layers=pruning_layers).keep_counts(visual)
        assert list(counts) == sorted(counts, reverse=True) and all(0 <= k <= visual for k in counts)
        assert (counts == (visual,) * len(pruning_layers)) == (retain == visual), (retain, counts)
        if previous is not None:
            assert all(abs(b - a) <= 6 for a, b in zip(previous, counts)), (retain, previous, counts)
            assert counts[-1] >= previous[-1], (retain, previous, counts)
        previous = counts


def test_small_tower_example():
    assert make_config(64).keep_counts(256) == (134, 59, 24)  # a 224 px tower: 256 visual tokens


def test_scaling_examples():
    assert make_config(64).keep_counts(1152) == (132, 60, 34)  # two images
    assert make_config(192).keep_counts(2880) == (1500, 1000, 550)  # anyres 5 x 576


def test_custom_schedule_is_absolute_and_clipped_to_the_visual_count():
    config = make_config(keep_schedule="100,50,10")
    assert config.retain_tokens is None and config.keep_schedule == (100, 50, 10)
    assert config.keep_counts(576) == (100, 50, 10)
    assert config.keep_counts(1152) == (100, 50, 10)  # not scaled
    assert config.keep_counts(60) == (60, 50, 10)  # clipped
    assert config.keep_counts(0) == (0, 0, 0)


def test_other_budgets_interpolate_monotonically():
    previous = None
    for retain in range(1, 700, 7):
        counts = retain_schedule(retain, 3)
        assert list(counts) == sorted(counts, reverse=True), (retain, counts)
        assert all(0 < k <= 576 for k in counts), (retain, counts)
        if previous is not None:  # a bigger budget never keeps fewer tokens at the last layer
            assert counts[-1] >= previous[-1], (retain, counts, previous)
        previous = counts
    assert retain_schedule(576, 3) == (576, 576, 576)
    assert retain_schedule(1000, 3) == (576, 576, 576)
    # Not three layers: the budget at every layer.
    assert make_config(64, pruning_layers=(3, 9)).keep_counts(576) == (64, 64)


def test_layers_and_recycle_forms():
    assert make_config(pruning_layers="3, 7,12").pruning_layers == (3, 7, 12)
    assert make_config(pruning_layers=[4]).pruning_layers == (4,)
    for text, value in [("1", True), ("true", True), ("ON", True), ("0", False), ("false", False),
                        ("off", False), (True, True), (False, False)]:
        assert make_config(recycle=text).recycle is value


def test_recycle_counts():
    assert recycle_counts(576, 66) == 7  # ceil(66 / 10) merged tokens
    assert recycle_counts(73, 30) == 3
    assert recycle_counts(576, 576) == 0  # nothing pruned, nothing to merge
    assert recycle_counts(576, 0) == 0
    assert recycle_counts(12, 10) == 1  # limited by the candidates: ceil(0.3 * 2)


def test_config_from_env():
    env = {"SPARSEVLM_RETAIN": "64", "SPARSEVLM_LAYERS": "3,8,14", "SPARSEVLM_RECYCLE": "0"}
    config = config_from_env(env, num_layers=16)
    assert config == SparseConfig((3, 8, 14), 64, None, False)
    config = config_from_env({"SPARSEVLM_SCHEDULE": "50,20,5"})
    assert config.keep_schedule == (50, 20, 5) and config.retain_tokens is None
    assert config_from_env({}) == make_config()
    assert env_enabled({}) is True
    assert env_enabled({"SPARSEVLM": "0"}) is False
    assert env_enabled({"SPARSEVLM": "1"}) is True


# ----------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("value, parts", [
    ("abc", ["retain_tokens", "'abc'", "presets: 192, 128, 96, 64"]),
    ("", ["retain_tokens", "''", "positive number"]),
    (0, ["retain_tokens", "0", "positive number"]),
    (-64, ["retain_tokens", "-64", "positive number"]),
    ("6.5", ["retain_tokens", "'6.5'", "positive number"]),
    (True, ["retain_tokens", "True", "positive number"]),
])
def test_bad_retain(value, parts):
    with pytest.raises(ValueError) as excinfo:
        make_config(retain_tokens=value)
    assert_clear(excinfo, *parts)


@pytest.mark.parametrize("value, parts", [
    ("", ["pruning_layers", "''", "comma-separated list of integers"]),
    ((), ["pruning_layers", "()", "comma-separated list of integers"]),
    ("2,x,15", ["pruning_layers", "'x'", "comma-separated list of integers"]),
    ("two", ["pruning_layers", "'two'", "comma-separated list of integers"]),
    (2, ["pruning_layers", "2", "comma-separated list of integers"]),
    ("6,2,15", ["pruning_layers", "6,2,15", "increasing"]),
    ((2, 2, 15), ["pruning_layers", "2,2,15", "increasing"]),
    ("0,6,15", ["pruning_layers", "0,6,15", "layer 0", ">= 1"]),
    ((-1, 6, 15), ["pruning_layers", "-1,6,15", ">= 1"]),
])
def test_bad_layers(value, parts):
    with pytest.raises(ValueError) as excinfo:
        make_config(pruning_layers=value)
    assert_clear(excinfo, *parts)


def test_layer_0_is_refused():
    with pytest.raises(ValueError) as excinfo:
        make_config(pruning_layers=(0,))
    assert_clear(excinfo, "pruning_layers", "0", "must be >= 1")


def test_layer_past_the_depth():
    with pytest.raises(ValueError) as excinfo:
        make_config(pruning_layers=(2, 6, 16), num_layers=16)
    assert_clear(excinfo, "pruning_layers", "2,6,16", "16", "past the model's depth", "1..15")
    assert make_config(pruning_layers=(2, 6, 15), num_layers=16).pruning_layers == (2, 6, 15)


@pytest.mark.parametrize("value, parts", [
    ("66,30", ["keep_schedule", "'66,30'", "2 counts", "3 layers", "one keep count per pruning layer"]),
    ((66, 30, 17, 5), ["keep_schedule", "66,30,17,5", "one keep count per pruning layer"]),
    ("66,30,x", ["keep_schedule", "'x'", "comma-separated list of integers"]),
    ("66,-1,-2", ["keep_schedule", "66,-1,-2", "negative", ">= 0"]),
    ("30,66,17", ["keep_schedule", "30,66,17", "increases", "non-increasing"]),
    ("", ["keep_schedule", "''", "comma-separated list of integers"]),
])
def test_bad_schedule(value, parts):
    with pytest.raises(ValueError) as excinfo:
        make_config(keep_schedule=value)
    assert_clear(excinfo, *parts)


def test_retain_and_schedule_both_set():
    with pytest.raises(ValueError) as excinfo:
        make_config(retain_tokens=64, keep_schedule=(66, 30, 17))
    assert_clear(excinfo, "retain_tokens=64", "keep_schedule=66,30,17", "not both")


@pytest.mark.parametrize("value", ["maybe", "2", "", "yess"])
def test_bad_recycle(value):
    with pytest.raises(ValueError) as excinfo:
        make_config(recycle=value)
    assert_clear(excinfo, "recycle", repr(value), "1/0")


@pytest.mark.parametrize("env, parts", [
    ({"SPARSEVLM_RETAIN": "lots"}, ["SPARSEVLM_RETAIN", "'lots'", "presets"]),
    ({"SPARSEVLM_LAYERS": "2;6;15"}, ["SPARSEVLM_LAYERS", "'2;6;15'", "comma-separated"]),
    ({"SPARSEVLM_LAYERS": "15,6,2"}, ["SPARSEVLM_LAYERS", "15,6,2", "increasing"]),
    ({"SPARSEVLM_LAYERS": "2,6,40"}, ["SPARSEVLM_LAYERS", "2,6,40", "1..15"]),
    ({"SPARSEVLM_SCHEDULE": "66,30"}, ["SPARSEVLM_SCHEDULE", "66,30", "SPARSEVLM_LAYERS",
                                       "one keep count per pruning layer"]),
    ({"SPARSEVLM_SCHEDULE": "17,30,66"}, ["SPARSEVLM_SCHEDULE", "17,30,66", "non-increasing"]),
    ({"SPARSEVLM_RETAIN": "64", "SPARSEVLM_SCHEDULE": "66,30,17"},
     ["SPARSEVLM_RETAIN", "SPARSEVLM_SCHEDULE", "not both"]),
    ({"SPARSEVLM_RECYCLE": "sometimes"}, ["SPARSEVLM_RECYCLE", "'sometimes'", "1/0"]),
])
def test_bad_env_values_name_the_env_variable(env, parts):
    with pytest.raises(ValueError) as excinfo:
        config_from_env(env, num_layers=16)
    assert_clear(excinfo, *parts)


def test_bad_sparsevlm_switch():
    with pytest.raises(ValueError) as excinfo:
        env_enabled({"SPARSEVLM": "maybe"})
    assert_clear(excinfo, "SPARSEVLM", "'maybe'", "1/0")


@pytest.mark.parametrize("env, parts", [
    ({"SPARSEVLM_RETAIN": "abc"}, ["ValueError", "SPARSEVLM_RETAIN", "'abc'"]),
    ({"SPARSEVLM": "perhaps"}, ["ValueError", "SPARSEVLM", "'perhaps'"]),
    ({"SPARSEVLM": "0", "SPARSEVLM_LAYERS": "6,2"}, ["ValueError", "SPARSEVLM_LAYERS", "6,2"]),
])
def test_bad_env_fails_at_import(env, parts):
    """`import sparsevlm_patch` validates the environment before any model runs."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEVLM")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", "import sparsevlm_patch"], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for part in parts:
        assert part in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- on a model

def test_enable_checks_the_model_depth(tiny_llava):
    import sparsevlm_patch

    model = tiny_llava[1]
    assert model.config.num_hidden_layers == 16
    sparsevlm_patch.enable(model, retain_tokens=64, pruning_layers=(2, 6, 15))
    before = model.get_model()._sparsevlm_state
    with pytest.raises(ValueError) as excinfo:
        sparsevlm_patch.enable(model, retain_tokens=64, pruning_layers=(2, 6, 16))
    assert_clear(excinfo, "pruning_layers", "16", "1..15", "16 decoder layers")
    # A refused configuration leaves the model as it was.
    assert model.get_model()._sparsevlm_state is before
    with pytest.raises(ValueError) as excinfo:
        sparsevlm_patch.enable(model, pruning_layers=(0, 6, 15))
    assert_clear(excinfo, "pruning_layers", "0,6,15", ">= 1")
    with pytest.raises(ValueError) as excinfo:
        sparsevlm_patch.enable(model, retain_tokens=64, keep_schedule=(66, 30, 17))
    assert_clear(excinfo, "retain_tokens", "keep_schedule", "not both")
    with pytest.raises(ValueError) as excinfo:
        sparsevlm_patch.enable(model, keep_schedule=(66, 30))
    assert_clear(excinfo, "keep_schedule", "66,30", "one keep count per pruning layer")


def _tiny_forward(tokenizer, model, image_processor, image):
    import torch
    from llava.mm_utils import process_images

    from sparsevlm_patch.tiny import prompt_ids

    ids = prompt_ids(tokenizer, "What is in the image?").unsqueeze(0)
    pixels = process_images([image], image_processor, model.config)
    with torch.inference_mode():
        return model(ids, images=pixels, image_sizes=[image.size])


@pytest.fixture
def clean_env(monkeypatch):
    """No SPARSEVLM* variables from the caller's environment."""
    import sparsevlm_patch

    for name in list(os.environ):
        if name.startswith("SPARSEVLM"):
            monkeypatch.delenv(name)
    sparsevlm_patch.apply()  # installed even when the suite runs under SPARSEVLM=0
    return monkeypatch


def test_env_configures_models_never_enabled(tiny_llava, tiny_images, clean_env):
    import sparsevlm_patch

    monkeypatch = clean_env
    monkeypatch.setenv("SPARSEVLM_RETAIN", "64")
    monkeypatch.setenv("SPARSEVLM_RECYCLE", "0")
    model = tiny_llava[1]
    _tiny_forward(*tiny_llava, tiny_images[0])
    stats = sparsevlm_patch.last_stats(model)
    assert stats["kept_visual"] == [[66, 30, 17]]
    assert stats["recycled"] == [[0, 0, 0]]


def test_env_layer_past_the_depth_fails_when_the_model_is_built(tiny_llava_dir, clean_env):
    from conftest import load_tiny_llava

    clean_env.setenv("SPARSEVLM_LAYERS", "2,6,16")
    with pytest.raises(ValueError) as excinfo:
        load_tiny_llava(tiny_llava_dir)
    assert_clear(excinfo, "SPARSEVLM_LAYERS", "2,6,16", "1..15")


def test_enable_takes_design_md_positional_order_and_defaults(tiny_llava, tiny_images, clean_env):
    """`enable(model, retain_tokens=64, pruning_layers=(2, 6, 15), recycle=True)`, in that order."""
    import sparsevlm_patch

    model = tiny_llava[1]
    sparsevlm_patch.enable(model, 96, (2, 6, 15), False)
    _tiny_forward(*tiny_llava, tiny_images[0])
    stats = sparsevlm_patch.last_stats(model)
    assert stats["kept_visual"] == [[238, 48, 26]] and stats["recycled"] == [[0, 0, 0]]
    sparsevlm_patch.enable(model)
    _tiny_forward(*tiny_llava, tiny_images[0])
    stats = sparsevlm_patch.last_stats(model)
    assert stats["pruning_layers"] == [2, 6, 15] and stats["kept_visual"] == [[66, 30, 17]]
    assert any(n > 0 for n in stats["recycled"][0])
