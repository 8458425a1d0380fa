"""Upstream-only computations, shared by the in-process tests and a clean subprocess.

Imports nothing from ``sparsevlm_patch``: run as a script (``python upstream_cases.py
MODEL_DIR INPUTS OUT``) it computes upstream's outputs in a process that never saw the
plugin, then imports the plugin with ``SPARSEVLM=0`` and checks that it changes nothing,
and that ``apply()`` / ``remove()`` put back the exact original functions.
"""
import sys

import torch

from conftest import load_tiny_llava  # imports nothing from sparsevlm_patch

MAX_NEW_TOKENS = 6


def outputs(model, inputs):
    """Logits and greedy generations for a fixed set of inputs (see make_inputs in
    test_inference.py): one image prompt, a right-padded batch with a text-only sample, a
    text-only prompt without images, and a left-padded generation batch."""
    out = {}
    saved = model.config.tokenizer_padding_side
    try:
        with torch.inference_mode():
            model.config.tokenizer_padding_side = "right"
            out["single"] = model(inputs["single_ids"], images=inputs["single_pixels"],
                                  image_sizes=inputs["sizes"][:1]).logits
            out["batch"] = model(inputs["right_ids"], attention_mask=inputs["right_mask"],
                                 images=inputs["batch_pixels"], image_sizes=inputs["sizes"]).logits
            out["text"] = model(inputs["text_ids"]).logits
            out["generate"] = model.generate(
                inputs["single_ids"], images=inputs["single_pixels"], image_sizes=inputs["sizes"][:1],
                max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            model.config.tokenizer_padding_side = "left"
            out["generate_left"] = model.generate(
                inputs["left_ids"], attention_mask=inputs["left_mask"], images=inputs["batch_pixels"],
                image_sizes=inputs["sizes"], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    finally:
        model.config.tokenizer_padding_side = saved
    return out


def patch_targets():
    """(owner, name) of every function the plugin's inference hooks replace."""
    from llava.model.llava_arch import LlavaMetaForCausalLM
    from transformers.models.llama import modeling_llama

    return [(modeling_llama.LlamaModel, "forward"),
            (modeling_llama.LlamaRotaryEmbedding, "forward"),
            (LlavaMetaForCausalLM, "prepare_inputs_labels_for_multimodal")]


def current(targets):
    return [owner.__dict__[name] for owner, name in targets]


def main(model_dir, inputs_path, out_path, threads):
    assert "sparsevlm_patch" not in sys.modules
    torch.set_num_threads(int(threads))  # the parent's: bit-identical results need the same
    _, model, _ = load_tiny_llava(model_dir)
    inputs = torch.load(inputs_path)
    reference = outputs(model, inputs)
    targets = patch_targets()
    originals = current(targets)
    assert "sparsevlm_patch" not in sys.modules

    import sparsevlm_patch  # SPARSEVLM=0 in the environment: installs nothing

    checks = {"untouched_after_import": all(a is b for a, b in zip(current(targets), originals))}
    off = outputs(model, inputs)
    sparsevlm_patch.apply()
    checks["wrapped_after_apply"] = all(a is not b for a, b in zip(current(targets), originals))
    checks["wraps_originals"] = all(getattr(a, "__wrapped__", None) is b
                                    for a, b in zip(current(targets), originals))
    sparsevlm_patch.remove()
    checks["identical_after_remove"] = all(a is b for a, b in zip(current(targets), originals))
    sparsevlm_patch.apply()
    sparsevlm_patch.remove()
    checks["identical_after_second_remove"] = all(a is b for a, b in zip(current(targets), originals))
    torch.save({"reference": reference, "off": off, "checks": checks}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:5])
