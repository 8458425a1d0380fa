"""LLaVA-NeXT's Qwen2 LLaVA (`LlavaQwenForCausalLM`, transformers' `Qwen2Model`), as PyPI's
`llavaction` 0.0.1 ships it, prunes for real, held to Llama's contracts.

The tiny Qwen here is built from llavaction's own classes (its LlavaMetaModel builds the vision
tower, resampler and projector from the tiny LLaVA's settings) and carries the tiny
LLaVA-Llama's weights: Qwen2's decoder has Llama's modules plus q/k/v biases, set to zero, and
the same RoPE base, so its dense outputs equal Llama's bit for bit. Every selection rule then
keeps exactly the tokens it keeps on Llama, where the naive-selection tests (test_inference.py,
test_rules.py) pin them down. LLaVA-NeXT's splice takes `modalities` and returns 7 values
(`action_idx` last); both go through the plugin's splice wrapper untouched.

Training: llavaction's own trainer cannot run with this stack (`llavaction.train.*` imports
`AcceleratorConfig` from transformers' trainer_pt_utils, which 4.37.2 lacks). Through upstream
llava-torch's `LLaVATrainer`, a sparse Qwen student trains (LM loss only, no teacher), and a
distillation step runs with the teacher loaded by the student's class.

transformers 4.37.2 Qwen2 applies `config.sliding_window` in eager attention even with
`use_sliding_window=False` (SDPA ignores it, flash applies it only with `use_sliding_window`);
the tiny models here set `sliding_window=None` except the test that checks the plugin applies
the eager window as upstream does.
"""
import warnings

import pytest
import torch
from llava.mm_utils import process_images

import sparsevlm_patch
from sparsevlm_patch.tiny import prompt_ids
from test_mistral import ATOL, QUESTIONS, copy_rope_tables, generate, run, training_steps


def as_qwen(llama, sliding_window=None, attn="sdpa"):
    """A llavaction LlavaQwenForCausalLM with `llama`'s weights (its vision tower's too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # llavaction's import: pyav / OpenCLIP not installed
        from llavaction.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM

    config = LlavaQwenConfig(**{k: v for k, v in llama.config.to_dict().items() if k != "model_type"})
    config.sliding_window = sliding_window  # see the module docstring
    assert config.rope_theta == llama.config.rope_theta and config.bos_token_id is not None
    assert not config.use_sliding_window
    model = LlavaQwenForCausalLM._from_config(config, attn_implementation=attn)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
                                              for k in missing), (missing, unexpected)
    for layer in model.get_model().layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.zeros_(proj.bias)
    copy_rope_tables(model, llama)
    return model.float().eval()


@pytest.fixture
def pair(tiny_llava, tiny_images):
    tokenizer, llama, processor = tiny_llava
    pixels = process_images(tiny_images, processor, llama.config)
    return tokenizer, llama, as_qwen(llama), pixels, [image.size for image in tiny_images]


def test_qwen_is_a_supported_family(pair):
    from sparsevlm_patch.families import check_prunable, family_of

    _, _, qwen, _, _ = pair
    assert family_of(qwen).lm_class == "Qwen2Model"
    check_prunable(qwen, "test")  # no error


def test_dense_qwen_equals_llama_and_disable_or_remove_is_upstream(pair):
    tokenizer, llama, qwen, pixels, sizes = pair
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    kwargs = dict(images=pixels[:1], image_sizes=sizes[:1])
    sparsevlm_patch.disable(llama)
    sparsevlm_patch.disable(qwen)
    dense = run(qwen, ids, **kwargs).logits
    assert torch.equal(dense, run(llama, ids, **kwargs).logits)
    sparsevlm_patch.remove()
    try:
        assert torch.equal(run(qwen, ids, **kwargs).logits, dense)
    finally:
        sparsevlm_patch.apply()
    # Nothing to prune (a budget at or above the visual count): upstream's forward exactly.
    sparsevlm_patch.enable(qwen, retain_tokens=576)
    assert torch.equal(run(qwen, ids, **kwargs).logits, dense)
    assert sparsevlm_patch.last_stats(qwen)["kept_visual"] == [[576, 576, 576]]


def test_the_splice_passes_modalities_and_returns_upstreams_seven_values(pair):
    """LLaVA-NeXT's splice called as its forward calls it (positionally, `modalities` before
    `image_sizes`), with labels: every value equals upstream's, `action_idx` included."""
    tokenizer, _, qwen, pixels, sizes = pair
    seqs = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    length = max(len(s) for s in seqs)
    ids = torch.full((2, length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    labels = torch.where(mask.bool() & (ids >= 0), ids, torch.full_like(ids, -100))
    outputs = []
    for enabled in (False, True):
        if enabled:
            sparsevlm_patch.enable(qwen, retain_tokens=64)
        else:
            sparsevlm_patch.disable(qwen)
        for attention_mask in (mask, None):
            with torch.inference_mode():
                outputs.append(qwen.prepare_inputs_labels_for_multimodal(
                    ids, None, attention_mask, None, labels, pixels, ["image", "image"], sizes))
    for upstream, ours in zip(outputs[:2], outputs[2:]):
        assert len(ours) == len(upstream) == 7
        for got, want in zip(ours, upstream):
            assert (got is None and want is None) or torch.equal(got, want)
    assert outputs[3][2] is None  # no mask given: none returned, as upstream


def test_the_environment_prunes_a_qwen_never_enabled(tiny_llava, tiny_images, monkeypatch):
    """llavaction's own loader is not hooked: a model it loads takes the environment's
    configuration at its first splice (SPARSEVLM=1, the default)."""
    tokenizer, llama, processor = tiny_llava
    qwen = as_qwen(llama)
    monkeypatch.setenv("SPARSEVLM_RETAIN", "64")
    pixels = process_images(tiny_images[:1], processor, llama.config)
    generate(qwen, prompt_ids(tokenizer, QUESTIONS[0])[None], pixels, [tiny_images[0].size], new_tokens=1)
    assert sparsevlm_patch.last_stats(qwen)["kept_visual"] == [[66, 30, 17]]


def test_the_eager_sliding_window_is_applied_as_upstream_applies_it(tiny_llava, tiny_images):
    """transformers 4.37.2 Qwen2 applies `sliding_window` in eager attention whatever
    `use_sliding_window` says; with nothing pruned, the plugin's own layers and masks (the fast
    path's fixed-shape prefill and static decode, run eagerly on the CPU) equal upstream."""
    tokenizer, llama, processor = tiny_llava
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    pixels = process_images(tiny_images[:1], processor, llama.config)
    sizes = [tiny_images[0].size]
    windowed = as_qwen(llama, sliding_window=48, attn="eager")
    sparsevlm_patch.disable(windowed)
    upstream = generate(windowed, ids, pixels, sizes, new_tokens=3)
    unwindowed = as_qwen(llama, attn="eager")
    sparsevlm_patch.disable(unwindowed)
    assert not torch.allclose(run(unwindowed, ids, images=pixels, image_sizes=sizes).logits[:, -1],
                              upstream.scores[0], atol=1e-3)
    sparsevlm_patch.enable(windowed, keep_schedule=(576, 576, 576), cuda_graphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no capture on a CPU: said once per process
        ours = generate(windowed, ids, pixels, sizes, new_tokens=3)
    assert "fast_path" in sparsevlm_patch.last_stats(windowed)
    assert torch.equal(ours.sequences, upstream.sequences)
    for got, want in zip(ours.scores, upstream.scores):
        assert torch.allclose(got, want, atol=ATOL, rtol=0)


def test_a_sparse_qwen_student_trains_through_upstreams_trainer(pair, tmp_path):
    """Two steps through llava-torch's LLaVATrainer, no teacher: the student prunes in every step
    and its LM loss comes from LLaVA-NeXT's own forward, on the labels the splice relaid."""
    tokenizer, _, qwen, pixels, _ = pair
    _, logs = training_steps(qwen, tokenizer, pixels, tmp_path, align_loss_weight=0.0)
    assert len(logs) == 2
    for entry in logs:
        assert (entry["kept_visual_l2"], entry["kept_visual_l6"], entry["kept_visual_l15"]) == (66, 30, 17)
        assert entry["lm_loss"] > 0 and "align_loss" not in entry


def test_distillation_with_a_qwen_student_and_its_teacher(pair, tmp_path):
    tokenizer, _, qwen, pixels, _ = pair
    folder = str(tmp_path / "tiny-llava-qwen")
    qwen.save_pretrained(folder)
    trainer, logs = training_steps(qwen, tokenizer, pixels, tmp_path, teacher_model_name_or_path=folder)
    assert len(logs) == 2 and all(entry["align_loss"] > 0 for entry in logs)
    teacher = trainer._sparsevlm_distill.teacher
    assert type(teacher).__name__ == "LlavaQwenForCausalLM"
    assert sparsevlm_patch.last_stats(teacher) is None
