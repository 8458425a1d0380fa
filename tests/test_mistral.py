"""LLaVA-1.6 Mistral (`LlavaMistralForCausalLM`, transformers' `MistralModel`) prunes for real,
held to Llama's contracts.

The tiny Mistral here carries the tiny LLaVA-Llama's weights (the two LMs have the same
modules), so without a sliding window its dense outputs equal Llama's: every selection rule
then keeps exactly the tokens it keeps on Llama, where the naive-selection tests
(test_inference.py, test_rules.py) pin them down. The contracts every family shares (rules,
batch == single, generation) are in test_family_contracts.py; Mistral's own ones are here.
"""
import os
import warnings

import pytest
import torch
from llava.mm_utils import process_images

import sparsevlm_patch
from sparsevlm_patch.tiny import prompt_ids

ATOL = 2e-5
QUESTIONS = ("What color is the shape in the top-left?", "How many shapes are in the image? One word.")


def as_mistral(llama, sliding_window=None, attn="sdpa"):
    """A LlavaMistralForCausalLM with `llama`'s weights and vision tower."""
    from llava.model import LlavaMistralConfig, LlavaMistralForCausalLM

    config = LlavaMistralConfig(**{k: v for k, v in llama.config.to_dict().items() if k != "model_type"})
    config.sliding_window = sliding_window
    model = LlavaMistralForCausalLM._from_config(config, attn_implementation=attn)
    model.get_model().vision_tower = llama.get_model().vision_tower
    state = {k: v for k, v in llama.state_dict().items() if ".vision_tower." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".vision_tower." in k for k in missing), (missing, unexpected)
    copy_rope_tables(model, llama)
    return model.float().eval()


def copy_rope_tables(model, llama) -> None:
    """Upstream's loader built Llama's RoPE tables in fp16 (then cast): the same values here."""
    for mine, theirs in zip(model.get_model().layers, llama.get_model().layers):
        mine.self_attn.rotary_emb.cos_cached = theirs.self_attn.rotary_emb.cos_cached.clone()
        mine.self_attn.rotary_emb.sin_cached = theirs.self_attn.rotary_emb.sin_cached.clone()


@pytest.fixture
def pair(tiny_llava, tiny_images):
    tokenizer, llama, processor = tiny_llava
    pixels = process_images(tiny_images, processor, llama.config)
    return tokenizer, llama, as_mistral(llama), pixels, [image.size for image in tiny_images]


def run(model, ids, **kwargs):
    with torch.inference_mode():
        return model(ids, **kwargs)


def test_dense_mistral_equals_llama_and_disable_or_remove_is_upstream(pair):
    tokenizer, llama, mistral, pixels, sizes = pair
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    kwargs = dict(images=pixels[:1], image_sizes=sizes[:1])
    sparsevlm_patch.disable(llama)
    sparsevlm_patch.disable(mistral)
    dense = run(mistral, ids, **kwargs).logits
    assert torch.allclose(dense, run(llama, ids, **kwargs).logits, atol=ATOL, rtol=0)
    sparsevlm_patch.remove()
    try:
        assert torch.equal(run(mistral, ids, **kwargs).logits, dense)
    finally:
        sparsevlm_patch.apply()


def generate(model, ids, pixels, sizes, new_tokens=5, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, images=pixels, image_sizes=sizes, max_new_tokens=new_tokens, do_sample=False,
                              return_dict_in_generate=True, output_scores=True, **kwargs)


def test_sliding_window_holds_inside_compact_batches(tiny_llava, tiny_images):
    """Eager Mistral with a 48-token window on a 625-token prompt (upstream 4.37 applies the
    window in eager attention). With nothing pruned, the plugin's own layers and masks (the
    fast path's fixed-shape prefill and static decode, run eagerly on the CPU) equal
    upstream; pruned, the dynamic decode and the static decode (two separate mask builders)
    agree; and the window really changes the outputs (prefill and decode)."""
    tokenizer, llama, processor = tiny_llava
    ids = prompt_ids(tokenizer, QUESTIONS[0])[None]
    pixels = process_images(tiny_images[:1], processor, llama.config)
    sizes = [tiny_images[0].size]
    windowed = as_mistral(llama, sliding_window=48, attn="eager")
    sparsevlm_patch.disable(windowed)
    upstream = generate(windowed, ids, pixels, sizes)
    sparsevlm_patch.enable(windowed, keep_schedule=(576, 576, 576), cuda_graphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no capture on a CPU: said once per process
        ours = generate(windowed, ids, pixels, sizes)
    assert "fast_path" in sparsevlm_patch.last_stats(windowed)
    assert torch.equal(ours.sequences, upstream.sequences)
    for got, want in zip(ours.scores, upstream.scores):
        assert torch.allclose(got, want, atol=ATOL, rtol=0)

    unwindowed = as_mistral(llama, attn="eager")
    sparsevlm_patch.disable(unwindowed)
    assert not torch.allclose(generate(unwindowed, ids, pixels, sizes).scores[0], upstream.scores[0], atol=1e-3)

    # Pruned: a 600-token window, which the question still sees the whole image through (a
    # narrower one leaves most visual tokens unseen by the raters, all tied at score 0).
    wide = as_mistral(llama, sliding_window=600, attn="eager")
    pruned = []
    for graphs in (False, True):
        sparsevlm_patch.enable(wide, retain_tokens=64, cuda_graphs=graphs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned.append(generate(wide, ids, pixels, sizes))
    sparsevlm_patch.enable(unwindowed, retain_tokens=64)
    assert not torch.allclose(generate(unwindowed, ids, pixels, sizes).scores[1], pruned[0].scores[1], atol=1e-3)
    assert torch.equal(pruned[0].sequences, pruned[1].sequences)
    for got, want in zip(pruned[0].scores, pruned[1].scores):
        assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_flash_attention_with_a_window_shorter_than_the_prompt_is_refused(tiny_llava):
    from sparsevlm_patch.sparse_forward import sliding_window

    _, llama, _ = tiny_llava
    model = as_mistral(llama, sliding_window=48)
    model.get_model().config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2 and sliding_window=48.*attn_implementation='eager'"):
        sliding_window(model.get_model(), 625)
    assert sliding_window(model.get_model(), 40) is None  # within the window: nothing to apply by slot


def training_steps(model, tokenizer, pixels, tmp_path, **flags):
    """Two steps of upstream's LLaVATrainer (retain 64) on one question and answer; returns the
    trainer and its loss logs. Shared by the family tests."""
    from llava.train import train as llava_train
    from llava.train.llava_trainer import LLaVATrainer

    ids = prompt_ids(tokenizer, QUESTIONS[0])
    answer = tokenizer("Red.", add_special_tokens=False, return_tensors="pt").input_ids[0]
    input_ids = torch.cat([ids, answer])
    labels = torch.cat([torch.full_like(ids, -100), answer])
    sample = dict(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids), images=pixels[0])
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    args = llava_train.TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=2, logging_steps=1,
        per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no", retain_tokens="64",
        remove_unused_columns=False, **flags)
    model.train()
    trainer = LLaVATrainer(model=model, args=args, train_dataset=[sample] * 4, data_collator=collate)
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


def test_distillation_with_a_mistral_student_and_its_upstream_teacher(pair, tmp_path):
    """One training step through upstream's LLaVATrainer: the student prunes, the teacher is
    loaded with the student's class from the checkpoint (as upstream loads it), dense."""
    tokenizer, _, mistral, pixels, sizes = pair
    folder = str(tmp_path / "tiny-llava-mistral")
    mistral.save_pretrained(folder, state_dict={k: v for k, v in mistral.state_dict().items()
                                                if ".vision_tower." not in k})
    trainer, logs = training_steps(mistral, tokenizer, pixels, tmp_path, teacher_model_name_or_path=folder)
    assert len(logs) == 2
    for entry in logs:
        assert (entry["kept_visual_l2"], entry["kept_visual_l6"], entry["kept_visual_l15"]) == (66, 30, 17)
        assert entry["align_loss"] > 0
    teacher = trainer._sparsevlm_distill.teacher
    assert type(teacher).__name__ == "LlavaMistralForCausalLM"
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sparsevlm_patch.last_stats(teacher) is None


def test_the_environment_prunes_a_mistral_loaded_by_upstreams_builder(tiny_llava_dir, tmp_path, monkeypatch):
    """SPARSEVLM=1 and upstream's load_pretrained_model on a LLaVA-Mistral checkpoint."""
    from llava.model.builder import load_pretrained_model
    from test_families import build_family

    folder = build_family(str(tmp_path), os.path.join(os.path.dirname(tiny_llava_dir), "clip"), "mistral")
    monkeypatch.setenv("SPARSEVLM_RETAIN", "64")
    monkeypatch.setenv("SPARSEVLM_LAYERS", "1,2,3")  # the checkpoint has 4 layers
    tokenizer, model, processor, _ = load_pretrained_model(folder, None, os.path.basename(folder), device="cpu",
                                                           device_map="cpu")
    model.float().eval()
    from PIL import Image

    image = Image.new("RGB", (336, 336), (200, 30, 30))
    from llava.constants import IMAGE_TOKEN_INDEX

    before = tokenizer("USER :").input_ids
    after = tokenizer("what is in the image ? ASSISTANT :", add_special_tokens=False).input_ids
    ids = torch.tensor([before + [IMAGE_TOKEN_INDEX] + after])
    with torch.inference_mode():
        model.generate(ids, images=process_images([image], processor, model.config), image_sizes=[image.size],
                       max_new_tokens=2, do_sample=False)
    assert sparsevlm_patch.last_stats(model)["kept_visual"] == [[66, 30, 17]]
