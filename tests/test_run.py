"""`python -m sparsevlm_patch.run`: an unchanged script or module, pruned, then a summary.

The target below is plain upstream usage of the tiny LLaVA on CPU; it never imports
sparsevlm_patch (upstream's own eval scripts call .cuda(), so they can't run here).
"""

import os
import subprocess
import sys

import pytest

TARGET = '''\
import sys

import torch
from PIL import Image
from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

args = sys.argv[1:]
code = int(args.pop()[len("--exit="):]) if args[-1].startswith("--exit=") else 0
# --sample: upstream's eval default (model_vqa_loader's --temperature 0.2, top_p None)
sampling = dict(do_sample=True, temperature=0.2, top_p=None) if "--sample" in args else dict(do_sample=False)
args = [a for a in args if a != "--sample"]
model_dir, image_paths = args[0], args[1:]
print("target argv0:", sys.argv[0])
tokenizer, model, processor, _ = load_pretrained_model(
    model_dir, None, "tiny-llava-v1", device="cpu", device_map="cpu")
model.float().eval()
conv = conv_templates["vicuna_v1"].copy()
conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\\nWhat is in the image?")
conv.append_message(conv.roles[1], None)
ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
for path in image_paths:
    image = Image.open(path).convert("RGB")
    with torch.inference_mode():
        out = model.generate(ids[None], images=process_images([image], processor, model.config),
                             image_sizes=[image.size], max_new_tokens=3, **sampling)
    print("generated", out.shape[1] - 1, "tokens")
sys.exit(code)
'''

KEPT_64 = "layer 2: 66.0, layer 6: 30.0, layer 15: 17.0"


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory):
    """A folder with the target as `tiny_generate.py` and two images."""
    from sparsevlm_patch.tiny import make_images

    folder = tmp_path_factory.mktemp("run_target")
    (folder / "tiny_generate.py").write_text(TARGET)
    names = make_images(str(folder), 2, seed=0)
    return folder, [str(folder / name) for name in names]


def run(args, cwd, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEVLM")}
    environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "sparsevlm_patch.run", *args], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sample", [False, True])
def test_script_is_pruned_with_retain_64(tiny_llava_dir, target_dir, sample):
    folder, images = target_dir
    script = str(folder / "tiny_generate.py")
    result = run([script, tiny_llava_dir, *images] + (["--sample"] if sample else []), cwd=folder.parent,
                 SPARSEVLM_RETAIN="64")
    assert result.returncode == 0, result.stderr
    assert f"target argv0: {script}" in result.stdout
    assert result.stdout.count("generated 3 tokens") == 2
    summary = result.stderr[result.stderr.index("sparsevlm summary"):]
    assert "2 sparse prefills (of 2 prefills seen)" in summary
    assert "visual tokens per sample (mean): 576.0" in summary
    assert f"kept visual tokens per pruning layer (mean per sample): {KEPT_64}" in summary
    assert "recycled tokens per pruning layer" in summary
    assert "prefill FLOPs vs dense (analytic): 0." in summary


def test_module_target_with_keep_schedule(tiny_llava_dir, target_dir):
    folder, images = target_dir
    result = run(["-m", "tiny_generate", tiny_llava_dir, images[0]], cwd=folder.parent,
                 PYTHONPATH=str(folder), SPARSEVLM_SCHEDULE="100,50,20", SPARSEVLM_RECYCLE="0")
    assert result.returncode == 0, result.stderr
    assert f"target argv0: {folder / 'tiny_generate.py'}" in result.stdout
    assert "1 sparse prefills" in result.stderr
    assert "layer 2: 100.0, layer 6: 50.0, layer 15: 20.0" in result.stderr
    assert "recycled tokens per pruning layer (mean per sample): layer 2: 0.0" in result.stderr


def test_disabled_runs_upstream_and_keeps_exit_code(tiny_llava_dir, target_dir):
    folder, images = target_dir
    script = str(folder / "tiny_generate.py")
    result = run([script, tiny_llava_dir, images[0], "--exit=3"], cwd=folder.parent,
                 SPARSEVLM="0", SPARSEVLM_RETAIN="64")
    assert result.returncode == 3, result.stderr
    assert "generated 3 tokens" in result.stdout
    assert "sparsevlm summary: no sparse prefill" in result.stderr
    assert "SPARSEVLM=0" in result.stderr


def test_bad_env_fails_before_the_target(target_dir):
    folder, _ = target_dir
    result = run([str(folder / "tiny_generate.py"), "unused"], cwd=folder.parent,
                 SPARSEVLM_LAYERS="2,six,15")
    assert result.returncode == 2
    assert "SPARSEVLM_LAYERS='2,six,15': 'six' is not a number" in result.stderr
    assert "Traceback" not in result.stderr
    assert "target argv0" not in result.stdout and "sparsevlm summary" not in result.stderr


def test_usage_errors(tmp_path):
    for args in ([], [str(tmp_path / "missing.py")]):
        result = run(args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "usage: python -m sparsevlm_patch.run" in result.stderr
        assert "sparsevlm summary" not in result.stderr


def test_tally_skips_text_only_prefills_and_samples():
    from sparsevlm_patch.run import Tally

    tally = Tally()
    tally({"pruning_layers": [2, 6], "visual_tokens": [0], "kept_visual": [[0, 0]],
           "recycled": [[0, 0]], "flops": {"ratio": 1.0}})
    tally({"pruning_layers": [2, 6], "visual_tokens": [576, 0, 288],
           "kept_visual": [[60, 20], [0, 0], [30, 10]], "recycled": [[6, 2], [0, 0], [3, 1]],
           "flops": {"sparse": 1.0, "dense": 4.0, "ratio": 4.0}})
    summary = tally.summary()
    assert "1 sparse prefills (of 2 prefills seen)" in summary
    assert "visual tokens per sample (mean): 432.0" in summary
    assert "layer 2: 45.0, layer 6: 15.0" in summary
    assert "layer 2: 4.5, layer 6: 1.5" in summary
    assert "0.250 of dense (4.00x fewer)" in summary
    assert "no sparse prefill (0 prefills seen)" in Tally().summary()


def test_cuda_graphs_option_takes_the_fast_path(tiny_llava_dir, target_dir):
    """`--cuda-graphs` sets SPARSEVLM_CUDA_GRAPHS=1; on a CPU the fixed-shape path runs without
    capture and the summary says so."""
    folder, images = target_dir
    script = str(folder / "tiny_generate.py")
    result = run(["--cuda-graphs", script, tiny_llava_dir, images[0]], cwd=folder.parent, SPARSEVLM_RETAIN="64")
    assert result.returncode == 0, result.stderr
    assert f"kept visual tokens per pruning layer (mean per sample): {KEPT_64}" in result.stderr
    assert "fast path (cuda_graphs): fixed-shape, eager; 0 CUDA graphs" in result.stderr
    assert "capture needs a CUDA device" in result.stderr
