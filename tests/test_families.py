"""A LLaVA whose language model the plugin cannot prune is refused, never run dense in silence:
at `enable()`, when upstream's `load_pretrained_model` returns it with SPARSEVLM=1, and when
the trainer is built with `--sparse` (before the teacher loads).

The models are upstream's `LlavaMptForCausalLM` and `LlavaMistralForCausalLM`, tiny, built
offline here (the tiny LLaVA's CLIP folder as their vision tower).
"""
import os
from types import SimpleNamespace

import pytest
import torch

import sparsevlm_patch
from sparsevlm_patch import distill
from sparsevlm_patch.families import FAMILIES, check_prunable, family_of
from sparsevlm_patch.state import get_state

# kind -> (LLaVA class, its LM's transformers class)
# The LLaVA classes llava-torch ships whose language model the plugin can't prune (Mistral's
# can: tests/test_mistral.py).
KINDS = {"mpt": ("LlavaMptForCausalLM", "MptModel")}


def tiny_tokenizer():
    """A small fast tokenizer built in memory: upstream's loader asks MPT and Mistral folders
    for a fast one, and converting the tiny LLaVA's sentencepiece model would need protobuf."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + "USER ASSISTANT : what is in the image ? a red circle .".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")


def llava_class(kind):
    from llava.model import LlavaMistralForCausalLM, LlavaMptForCausalLM

    return {"mpt": LlavaMptForCausalLM, "mistral": LlavaMistralForCausalLM}[kind]


def build_family(root, clip_dir, kind) -> str:
    """Save a tiny upstream LLaVA of `kind` with a vision tower; return its folder, whose name
    holds "llava" and the kind, as upstream's loader dispatches on the name."""
    from llava.model import LlavaMistralConfig, LlavaMptConfig

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    if kind == "mpt":
        config = LlavaMptConfig(d_model=64, n_heads=4, n_layers=4, expansion_ratio=2, max_seq_len=2048,
                                vocab_size=len(tokenizer))
    else:
        config = LlavaMistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                                    max_position_embeddings=2048)
    model = llava_class(kind)(config)
    model.get_model().initialize_vision_modules(SimpleNamespace(
        vision_tower=clip_dir, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu",
        mm_use_im_start_end=False, mm_use_im_patch_token=False))
    model.config.mm_use_im_start_end = model.config.mm_use_im_patch_token = False
    model.config.image_aspect_ratio = "pad"
    folder = os.path.join(root, f"tiny-llava-{kind}")
    # As tiny.py does: upstream's loader builds the tower from config.mm_vision_tower.
    weights = {k: v for k, v in model.state_dict().items() if ".vision_tower." not in k}
    model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("families")
    clip_dir = os.path.join(os.path.dirname(tiny_llava_dir), "clip")
    return {kind: build_family(str(root), clip_dir, kind) for kind in KINDS}


def assert_names_the_classes(message: str, kind: str) -> None:
    llava, lm = KINDS[kind]
    assert llava in message and lm in message, message
    assert "LlamaModel" in message and "LlavaLlamaForCausalLM" in message, message  # the supported ones


def test_llava_llama_is_the_supported_family(tiny_llava):
    _, model, _ = tiny_llava
    assert family_of(model) is FAMILIES[0] and FAMILIES[0].lm_class == "LlamaModel"
    check_prunable(model, "test")  # no error


@pytest.mark.parametrize("kind", KINDS)
def test_enable_refuses_and_configures_nothing(family_dirs, kind):
    model = llava_class(kind).from_pretrained(family_dirs[kind])
    with pytest.raises(ValueError, match=r"^sparsevlm_patch\.enable: .*Without enable\(\)") as error:
        sparsevlm_patch.enable(model, retain_tokens=64)
    assert_names_the_classes(str(error.value), kind)
    assert get_state(model) is None


@pytest.mark.parametrize("kind", KINDS)
def test_environment_path_refuses_at_load(family_dirs, kind, monkeypatch):
    from llava.model.builder import load_pretrained_model

    folder = family_dirs[kind]
    monkeypatch.setenv("SPARSEVLM", "1")
    with pytest.raises(ValueError, match=r"^SPARSEVLM=1 \(llava.model.builder.load_pretrained_model\)") as error:
        load_pretrained_model(folder, None, os.path.basename(folder), device="cpu", device_map="cpu")
    assert_names_the_classes(str(error.value), kind)
    assert "SPARSEVLM=0" in str(error.value)

    monkeypatch.setenv("SPARSEVLM", "0")  # upstream's loader, as upstream
    _, model, _, _ = load_pretrained_model(folder, None, os.path.basename(folder), device="cpu", device_map="cpu")
    assert type(model).__name__ == KINDS[kind][0]


@pytest.mark.parametrize("kind", KINDS)
def test_training_refuses_when_the_trainer_is_built(family_dirs, kind, tmp_path, monkeypatch):
    """As a launcher that builds upstream's LLaVATrainer on such a model (upstream's train()
    itself only builds Llama, and MPT with a config transformers 4.37 cannot take)."""
    from llava.train import train as llava_train
    from llava.train.llava_trainer import LLaVATrainer

    teachers = []
    monkeypatch.setattr(distill, "load_teacher", lambda *a, **k: teachers.append(a))
    model = llava_class(kind).from_pretrained(family_dirs[kind])
    args = llava_train.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"^--sparse True \(the student\): .*--sparse False runs upstream") as error:
        LLaVATrainer(model=model, args=args)
    assert_names_the_classes(str(error.value), kind)
    assert teachers == [] and get_state(model) is None

    # --sparse False: upstream's training, no check.
    args = llava_train.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", sparse=False)
    LLaVATrainer(model=model, args=args)


def test_distillation_setup_refuses_before_the_teacher_loads(family_dirs, monkeypatch):
    """The same check where the student is configured (a trainer built before the hooks were
    installed reaches it without the __init__ check)."""
    teachers = []
    monkeypatch.setattr(distill, "load_teacher", lambda *a, **k: teachers.append(a))
    model = llava_class("mpt").from_pretrained(family_dirs["mpt"])
    trainer = SimpleNamespace(args=SimpleNamespace(sparse=True, align_loss_weight=1.0))
    with pytest.raises(ValueError, match=r"^--sparse True \(the student\)") as error:
        distill._setup(trainer, model)
    assert_names_the_classes(str(error.value), "mpt")
    assert teachers == [] and get_state(model) is None


def test_another_codebases_llava_class_over_a_supported_lm_is_refused():
    """LLaVA-NeXT's own LlavaLlamaForCausalLM (llavaction) runs transformers' LlamaModel, but its
    splice is not the hooked one: refused, not run dense in silence."""
    from llavaction.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM(LlavaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, vocab_size=100))
    with pytest.raises(ValueError, match=r"llavaction\.model\.language_model\.llava_llama\.LlavaLlamaForCausalLM"):
        sparsevlm_patch.enable(model, retain_tokens=64)
    assert get_state(model) is None
