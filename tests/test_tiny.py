"""The tiny LLaVA behaves like upstream LLaVA-1.5 under upstream's own code."""

import contextlib
import io
import json
import os

import torch


def test_loads_with_upstream_loader_in_fp32(tiny_llava):
    tokenizer, model, image_processor = tiny_llava
    assert type(model).__name__ == "LlavaLlamaForCausalLM"
    assert model.get_vision_tower().is_loaded
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert len(tokenizer) == model.config.vocab_size
    assert image_processor.crop_size == {"height": 336, "width": 336}
    assert not model.training


def test_576_visual_tokens_per_image(tiny_llava, tiny_images):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images

    from sparsevlm_patch.tiny import prompt_ids

    tokenizer, model, image_processor = tiny_llava
    ids = prompt_ids(tokenizer, "What is in the image?")
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 1
    images = process_images(tiny_images, image_processor, model.config)
    assert images.shape == (2, 3, 336, 336)
    batch = ids.unsqueeze(0).repeat(2, 1)
    sizes = [image.size for image in tiny_images]
    with torch.inference_mode():
        out = model.prepare_inputs_labels_for_multimodal(
            batch, None, None, None, None, images, sizes)
    inputs_embeds = out[4]
    assert inputs_embeds.shape == (2, ids.numel() - 1 + 576, model.config.hidden_size)


def test_generate_runs_on_cpu(tiny_llava, tiny_images):
    from llava.mm_utils import process_images

    from sparsevlm_patch.tiny import prompt_ids

    tokenizer, model, image_processor = tiny_llava
    ids = prompt_ids(tokenizer, "What color is the shape in the top-left?").unsqueeze(0)
    images = process_images(tiny_images[:1], image_processor, model.config)
    with torch.inference_mode():
        out = model.generate(ids, images=images, image_sizes=[tiny_images[0].size],
                             max_new_tokens=5, do_sample=False)
        logits = model(ids, images=images, image_sizes=[tiny_images[0].size]).logits
    assert out.shape[0] == 1 and 2 <= out.shape[1] <= 6
    assert torch.isfinite(logits).all()


def test_preprocess_v1_labels_match(tiny_llava, tmp_path):
    import llava.conversation as conversation_lib
    from llava.constants import IGNORE_INDEX
    from llava.train import train as upstream_train

    from sparsevlm_patch.tiny import make_dataset

    tokenizer = tiny_llava[0]
    data_args = upstream_train.DataArguments(is_multimodal=True)
    data_args.mm_use_im_start_end = False
    saved = conversation_lib.default_conversation
    conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]
    try:
        for multi_turn in (False, True):
            path = make_dataset(str(tmp_path / f"data_{multi_turn}"), 8, multi_turn=multi_turn)
            records = json.load(open(path))
            assert all(os.path.exists(os.path.join(os.path.dirname(path), r["image"]))
                       for r in records)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                for record in records:
                    sources = upstream_train.preprocess_multimodal(
                        [record["conversations"]], data_args)
                    out = upstream_train.preprocess_v1(sources, tokenizer, has_image=True)
                    labels = out["labels"][0]
                    answers = [turn["value"] for turn in record["conversations"][1::2]]
                    target = tokenizer.decode(out["input_ids"][0][labels != IGNORE_INDEX])
                    assert target.replace("</s>", "").split() == " ".join(answers).split()
            assert "mismatch" not in printed.getvalue()
    finally:
        conversation_lib.default_conversation = saved
