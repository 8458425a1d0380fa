"""Shared fixtures: a tiny LLaVA built offline from upstream's classes.

Nothing from ``sparsevlm_patch`` is imported at import time here, so tests that need an
untouched upstream can run before the plugin is loaded; ``sparsevlm_patch.tiny`` is
imported inside the fixtures only.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

TINY_MODEL_NAME = "tiny-llava-v1"


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """Folder of a tiny LLaVA (16 layers, 576 visual tokens per image), weight_scale 10."""
    from sparsevlm_patch.tiny import build_tiny_llava

    root = tmp_path_factory.mktemp("tiny_llava")
    return build_tiny_llava(str(root), weight_scale=10.0)


def load_tiny_llava(model_dir):
    """Load with upstream's loader on CPU, then cast to fp32 (upstream loads fp16)."""
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_dir, None, TINY_MODEL_NAME, device="cpu", device_map="cpu")
    model.float()
    model.eval()
    return tokenizer, model, image_processor


@pytest.fixture
def tiny_llava(tiny_llava_dir):
    """``(tokenizer, model, image_processor)``: a fresh fp32 CPU model in eval mode."""
    return load_tiny_llava(tiny_llava_dir)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory):
    """Two RGB PIL images of colored shapes, 336 x 336."""
    from PIL import Image

    from sparsevlm_patch.tiny import make_images

    folder = tmp_path_factory.mktemp("tiny_images")
    names = make_images(str(folder), 2, seed=0)
    return [Image.open(folder / name).convert("RGB") for name in names]
