"""Dense vs SparseVLM generation on a tiny, offline LLaVA (CPU, well under a minute).

    make demo            # or: .venv/bin/python examples/demo.py

Builds a tiny LLaVA (random weights, the real 336 px CLIP geometry: 576 visual tokens per
image) into a temporary folder, asks two questions about two images in one padded batch,
and generates greedily twice: dense (upstream) and sparse (retain 64). The weights are
random, so the answers are not meaningful text; what matters is what is kept and computed.
"""
import os
import tempfile
import textwrap
import time

import torch
from PIL import Image

import sparsevlm_patch
from sparsevlm_patch.tiny import MODEL_FOLDER_NAME, build_tiny_llava, make_images, prompt_ids

QUESTIONS = ["What is in the image?", "What color is the shape in the top-left?"]
NEW_TOKENS = 16
RETAIN = 64


def load(model_dir):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(
        model_dir, None, MODEL_FOLDER_NAME, device="cpu", device_map="cpu")
    model.float().eval()
    # Batched generation appends after the prompt: pad on the left. Upstream re-pads the
    # spliced sequence by this config value, whatever side the caller padded.
    model.config.tokenizer_padding_side = "left"
    return tokenizer, model, processor


def left_padded_batch(tokenizer, questions):
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    return ids, mask


def generate(model, tokenizer, ids, mask, images, sizes, max_new_tokens=NEW_TOKENS):
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, images=images, image_sizes=sizes,
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    return out, tokenizer.batch_decode(out, skip_special_tokens=True), seconds


def side_by_side(left, right, width=44):
    left_lines = textwrap.wrap(left, width) or [""]
    right_lines = textwrap.wrap(right, width) or [""]
    rows = max(len(left_lines), len(right_lines))
    left_lines += [""] * (rows - len(left_lines))
    right_lines += [""] * (rows - len(right_lines))
    return "\n".join(f"    {a:<{width}} | {b}" for a, b in zip(left_lines, right_lines))


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main():
    from llava.mm_utils import process_images

    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sparsevlm-demo-") as root:
        print("building a tiny LLaVA (16 layers, hidden 64, 576 visual tokens per image) ...")
        model_dir = build_tiny_llava(root, weight_scale=10.0)
        tokenizer, model, processor = load(model_dir)
        image_dir = os.path.join(root, "images")
        images = [Image.open(os.path.join(image_dir, name)).convert("RGB")
                  for name in make_images(image_dir, 2, seed=0)]
        pixels = process_images(images, processor, model.config)
        sizes = [image.size for image in images]
        ids, mask = left_padded_batch(tokenizer, QUESTIONS)
        print(f"batch: {len(QUESTIONS)} samples, prompt lengths {mask.sum(1).tolist()} "
              f"(left-padded to {ids.shape[1]}), images {tuple(pixels.shape)}")

        sparsevlm_patch.disable(model)
        generate(model, tokenizer, ids, mask, pixels, sizes, max_new_tokens=2)  # warm-up
        dense_out, dense_text, dense_s = generate(model, tokenizer, ids, mask, pixels, sizes)

        sparsevlm_patch.enable(model, retain_tokens=RETAIN)
        sparse_out, sparse_text, sparse_s = generate(model, tokenizer, ids, mask, pixels, sizes)
        stats = sparsevlm_patch.last_stats(model)

        # A budget that prunes nothing must give upstream's answer.
        sparsevlm_patch.enable(model, retain_tokens=576)
        full_out, _, _ = generate(model, tokenizer, ids, mask, pixels, sizes)

    print(f"\ngreedy generation, {NEW_TOKENS} new tokens "
          f"(dense: upstream | sparse: retain_tokens={RETAIN})")
    for row, question in enumerate(QUESTIONS):
        # Outputs are [BOS, new tokens] (LLaVA generates from embeddings).
        same = common_prefix(dense_out[row, 1:].tolist(), sparse_out[row, 1:].tolist())
        print(f"\n  [{row}] {question}   ({same} leading new tokens identical)")
        print(side_by_side("dense:  " + dense_text[row], "sparse: " + sparse_text[row]))

    layers = stats["pruning_layers"]
    print(f"\nvisual tokens kept per pruning layer (layers {', '.join(map(str, layers))}):")
    for row in range(len(QUESTIONS)):
        kept = ", ".join(f"L{layer}: {k}" for layer, k in zip(layers, stats["kept_visual"][row]))
        recycled = ", ".join(f"L{layer}: {r}" for layer, r in zip(layers, stats["recycled"][row]))
        print(f"  [{row}] {stats['visual_tokens'][row]} visual -> kept {kept}; "
              f"recycled {recycled}")
    flops = stats["flops"]
    print(f"\nprefill FLOPs (analytic, decoder stack): dense {flops['dense']:.3g}, "
          f"sparse {flops['sparse']:.3g} -> {flops['sparse'] / flops['dense']:.3f} of dense "
          f"({flops['ratio']:.2f}x fewer)")
    print(f"check: sparse with retain_tokens=576 (nothing pruned) gives the dense tokens: "
          f"{torch.equal(full_out, dense_out)}")
    print(f"wall time of generate: dense {dense_s:.2f} s, sparse {sparse_s:.2f} s "
          "(tiny model on CPU: timing is dominated by overheads, not by the FLOPs above)")
    print(f"demo total: {time.perf_counter() - total:.1f} s")

    distillation_demo()


DISTILL_STEPS = 12


def distillation_demo():
    """A short distillation run of upstream's own training on the tiny model."""
    import ast
    import subprocess
    import sys

    from sparsevlm_patch.tiny import make_dataset

    print(f"\n--- distillation: {DISTILL_STEPS} steps of upstream llava.train.train through "
          "python -m sparsevlm_patch.train (sparse student at retain 64, frozen dense teacher) ---")
    with tempfile.TemporaryDirectory(prefix="sparsevlm-distill-") as root:
        model_dir = build_tiny_llava(os.path.join(root, "model"), weight_scale=10.0)
        data = make_dataset(os.path.join(root, "data"), 2, seed=3)
        command = [
            sys.executable, "-m", "sparsevlm_patch.train",
            "--model_name_or_path", model_dir, "--version", "v1",
            "--data_path", data, "--image_folder", os.path.dirname(data),
            "--vision_tower", os.path.join(root, "model", "clip"), "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
            "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad",
            "--lazy_preprocess", "True", "--model_max_length", "2048",
            "--output_dir", os.path.join(root, "out"), "--max_steps", str(DISTILL_STEPS),
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
            "--use_cpu", "True", "--disable_tqdm", "True",
            "--retain_tokens", "64", "--align_loss_weight", "5",
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            raise SystemExit(f"distillation run failed (exit code {done.returncode})")
        logs = [ast.literal_eval(line[line.index("{"):]) for line in done.stdout.splitlines()
                if line.lstrip().startswith("{'loss'")]
        for line in done.stdout.splitlines():
            if line.startswith("sparsevlm_patch:"):
                print(line)
        print(f"{'step':>4}  {'total':>7}  {'lm_loss':>7}  {'align_loss':>10}  kept visual (L2, L6, L15)")
        for step, entry in enumerate(logs, 1):
            layers = sorted((k for k in entry if k.startswith("kept_visual_l")), key=lambda k: int(k[13:]))
            kept = ", ".join(str(int(entry[k])) for k in layers)
            print(f"{step:>4}  {entry['loss']:7.3f}  {entry['lm_loss']:7.3f}  {entry['align_loss']:10.4f}  {kept}")
        print("(the teacher starts equal to the student; the first optimizer step moves the student "
              "away, then the alignment loss pulls it back while the LM loss falls)")
        print(f"distillation run: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
