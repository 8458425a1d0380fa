"""Upstream's own eval and CLI scripts, unchanged, through `python -m sparsevlm_patch.run`.

Their runtime needs come with the `upstream` extra (`make setup` installs it). On CPU:
`llava.serve.cli --device cpu` runs whole. `llava.eval.run_llava` and
`llava.eval.model_vqa_loader` load the model on CPU (their `load_pretrained_model` call
takes upstream's defaults, device_map="auto", and no flag of theirs picks a device) and then
hard-code CUDA (the lines in CUDA_LINES): without a GPU the tests check that they get that
far and no further; with one, that they answer, pruned.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEPT_64 = "kept visual tokens per pruning layer (mean per sample): layer 2: 66.0, layer 6: 30.0, layer 15: 17.0"
CUDA = torch.cuda.is_available()
# module -> (its file, the first line that needs CUDA, that line's code), llava-torch 1.2.2.post1
CUDA_LINES = {
    "llava.eval.run_llava": ("run_llava.py", 112, ".cuda()"),
    "llava.eval.model_vqa_loader": ("model_vqa_loader.py", 102,
                                    "input_ids = input_ids.to(device='cuda', non_blocking=True)"),
}


def run(args, stdin=None, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEVLM")}
    environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SPARSEVLM_RETAIN="64", **env)
    return subprocess.run([sys.executable, "-m", "sparsevlm_patch.run", *args], input=stdin, cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=300)


def summary(result) -> str:
    assert "sparsevlm summary" in result.stderr, result.stderr
    return result.stderr[result.stderr.index("sparsevlm summary"):]


def assert_stops_at_cuda(result, module) -> None:
    """Without a GPU: it ran until its first hard-coded CUDA call (the model was loaded)."""
    file, line, code = CUDA_LINES[module]
    assert result.returncode != 0
    assert "Torch not compiled with CUDA enabled" in result.stderr, result.stderr
    assert re.search(rf'llava/eval/{file}", line {line}, in eval_model\n\s*{re.escape(code)}', result.stderr), \
        result.stderr
    assert "no sparse prefill (0 prefills seen)" in summary(result)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sparsevlm_patch.tiny import make_images

    folder = tmp_path_factory.mktemp("eval_images")
    return folder, make_images(str(folder), 2, seed=0)


def test_make_setup_installs_the_upstream_extra():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        extra = tomllib.load(handle)["project"]["optional-dependencies"]["upstream"]
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert f"$(BIN)/pip install {' '.join(extra)}\n" in makefile
    assert all("==" in requirement for requirement in extra)  # pinned


def test_upstream_eval_and_cli_scripts_import():
    modules = ["llava.eval.model_vqa_loader", "llava.eval.model_vqa", "llava.eval.model_vqa_science",
               "llava.eval.model_vqa_mmbench", "llava.eval.model_qa", "llava.eval.run_llava", "llava.serve.cli"]
    out = subprocess.run([sys.executable, "-c", "import " + ", ".join(modules)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr


def test_cli_answers_pruned_on_cpu(tiny_llava_dir, images):
    """llava.serve.cli with its --device flag, and its default sampling (--temperature 0.2)."""
    folder, names = images
    result = run(["-m", "llava.serve.cli", "--model-path", tiny_llava_dir, "--image-file", str(folder / names[0]),
                  "--device", "cpu", "--max-new-tokens", "4"], stdin="What is in the image?\n")
    assert result.returncode == 0, result.stderr
    assert "ASSISTANT: " in result.stdout and result.stdout.rstrip().endswith("exit...")
    text = summary(result)
    assert "1 sparse prefills (of 1 prefills seen)" in text and KEPT_64 in text


def test_run_llava(tiny_llava_dir, images):
    folder, names = images
    result = run(["-m", "llava.eval.run_llava", "--model-path", tiny_llava_dir, "--image-file",
                  str(folder / names[0]), "--query", "What is in the image?", "--max_new_tokens", "4"])
    if not CUDA:
        return assert_stops_at_cuda(result, "llava.eval.run_llava")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the answer
    text = summary(result)
    assert "1 sparse prefills (of 1 prefills seen)" in text and KEPT_64 in text


def test_model_vqa_loader(tiny_llava_dir, images, tmp_path):
    """Question file, image folder, answers file; upstream's default --temperature 0.2 samples."""
    folder, names = images
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": name, "text": "What is in the image?"}) + "\n"
                                 for i, name in enumerate(names)))
    answers = tmp_path / "out" / "answers.jsonl"
    result = run(["-m", "llava.eval.model_vqa_loader", "--model-path", tiny_llava_dir, "--image-folder", str(folder),
                  "--question-file", str(questions), "--answers-file", str(answers), "--max_new_tokens", "4"])
    if not CUDA:
        assert answers.read_text() == ""  # opened before the loop, which stops at the first CUDA call
        return assert_stops_at_cuda(result, "llava.eval.model_vqa_loader")
    assert result.returncode == 0, result.stderr
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [a["question_id"] for a in written] == [0, 1]
    assert all(a["model_id"] == os.path.basename(tiny_llava_dir) and "text" in a for a in written)
    text = summary(result)
    assert "2 sparse prefills (of 2 prefills seen)" in text and KEPT_64 in text
