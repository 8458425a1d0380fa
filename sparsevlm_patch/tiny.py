"""A tiny LLaVA built offline from upstream's own classes.

Used by the tests, the demo and the benchmarks. Nothing here downloads anything: the
tokenizer is a small sentencepiece model trained on generated text, the vision tower is a
randomly initialised CLIP ViT with the real 336 px / patch 14 geometry (576 visual tokens),
and the language model is a narrow, 16-layer ``LlavaLlamaForCausalLM``.

This module imports nothing from the rest of ``sparsevlm_patch``.

Loading the built model with upstream's loader, on CPU, in fp32::

    from llava.model.builder import load_pretrained_model
    path = build_tiny_llava(root)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        path, None, "tiny-llava-v1", device="cpu", device_map="cpu")
    model.float().eval()

Gotchas of upstream's loader (llava 1.2.2.post1) that a caller must know:

* ``device="cpu"`` is needed, otherwise it asks for ``device_map="auto"``/CUDA. With it the
  language model is loaded with ``device_map={"": "cpu"}``.
* It always loads the language model in fp16 (``torch_dtype`` cannot be overridden through
  its ``**kwargs``) and then casts the vision tower to fp16 as well. ``model.float()``
  turns everything, vision tower included, into fp32. The fp32 weights written here are
  therefore rounded through fp16 once on load; that is deterministic.
* ``model_name`` must contain "llava", or the vision tower is never built.
* The model's ``config.mm_vision_tower`` is the absolute path of the CLIP folder made by
  :func:`build_tiny_llava`; keep the whole ``root`` folder together.
* Pass images in fp32 (``process_images(...)`` gives fp32) together with ``image_sizes``.
"""

from __future__ import annotations

import io
import json
import os
import random
from types import SimpleNamespace

__all__ = [
    "build_tokenizer",
    "build_clip",
    "build_tiny_llava",
    "make_images",
    "make_dataset",
    "prompt_ids",
    "MODEL_FOLDER_NAME",
]

MODEL_FOLDER_NAME = "tiny-llava-v1"

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "rectangle")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_FILLER_WORDS = (
    "the a an is are in on of and with at to this that there image picture photo shows "
    "left right top bottom middle center corner small large big tiny bright dark light "
    "background white shape shapes color colors object objects what which where how many "
    "describe please answer question yes no it its I you see can near next above below "
    "round sharp edge side one two three four five six seven eight nine ten"
).split()


# ---------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------

def _tokenizer_corpus(rng: random.Random, n_scenes: int = 400) -> list[str]:
    """English-like lines: the vicuna template, questions and answers about shapes."""
    lines = [
        VICUNA_SYSTEM,
        "USER: What is in the image? ASSISTANT: A red circle.</s>",
        "USER: <image>\nDescribe the image. ASSISTANT: There are two shapes.",
        "What is in the image?",
        "0 1 2 3 4 5 6 7 8 9 10 336 576 2048",
        ". , ; : ! ? ' \" ( ) [ ] - _ / < > = + * # %",
    ]
    for _ in range(n_scenes):
        scene = _random_scene(rng, size=336)
        for question, answer in _qa_pairs(rng, scene, k=3):
            lines.append(f"USER: {question} ASSISTANT: {answer}")
            lines.append(question)
            lines.append(answer)
    for _ in range(n_scenes):
        words = [rng.choice(_FILLER_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!"]))
    return lines


def build_tokenizer(out_dir: str, vocab_size: int = 1000):
    """Train a small sentencepiece BPE model and save it as a ``LlamaTokenizer``.

    Llama-style settings: byte fallback, unk/bos/eos = 0/1/2, no pad piece, dummy prefix,
    whitespace kept as is. The tokenizer is saved with ``pad_token = unk_token``,
    ``model_max_length = 2048`` and right padding, as upstream LLaVA-1.5 checkpoints are.
    Deterministic: the same call gives the same files.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    os.makedirs(out_dir, exist_ok=True)
    corpus = _tokenizer_corpus(random.Random(1234))
    # Written through a buffer: with model_prefix the trained file would record its own
    # path and differ from folder to folder.
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    vocab_file = os.path.join(out_dir, "tiny_sp.model")
    with open(vocab_file, "wb") as handle:
        handle.write(buffer.getvalue())
    tokenizer = LlamaTokenizer(
        vocab_file=vocab_file,
        legacy=True,
        model_max_length=2048,
        padding_side="right",
    )
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# ---------------------------------------------------------------------------------------
# vision tower
# ---------------------------------------------------------------------------------------

def build_clip(out_dir: str, image_size: int = 336, patch_size: int = 14, hidden: int = 32,
               layers: int = 3, seed: int = 0) -> str:
    """Save a random ``CLIPVisionModel`` and a matching ``CLIPImageProcessor``.

    ``(image_size // patch_size) ** 2`` visual tokens per image (576 by default). The
    processor's crop size equals ``image_size``. ``layers`` must be >= 2 because LLaVA
    reads the second-to-last hidden state. Returns ``out_dir``.
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if layers < 2:
        raise ValueError(f"build_clip: layers={layers}; LLaVA selects layer -2, so need >= 2")
    if image_size % patch_size:
        raise ValueError(f"build_clip: image_size={image_size} is not a multiple of "
                         f"patch_size={patch_size}")
    heads = 4 if hidden % 4 == 0 else 1
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------
# language model
# ---------------------------------------------------------------------------------------

def build_tiny_llava(root: str, *, image_size: int = 336, hidden: int = 64, layers: int = 16,
                     heads: int = 4, intermediate: int = 128, seed: int = 0,
                     weight_scale: float = 1.0) -> str:
    """Build ``root/tokenizer``, ``root/clip`` and ``root/tiny-llava-v1``; return the last.

    The model folder holds a ``LlavaLlamaForCausalLM`` (fp32 safetensors, without the
    vision tower's weights, which upstream loads from ``config.mm_vision_tower``) and its
    tokenizer. Its config carries the fields upstream's ``train.py`` sets (``image_aspect_ratio
    "pad"``, ``mm_use_im_start_end False``, ``mm_use_im_patch_token False``, right padding,
    ``tokenizer_model_max_length 2048``), so upstream's loader, ``generate`` and training
    treat it like LLaVA-1.5.

    ``weight_scale`` multiplies every 2-D weight of the decoder layers (attention and MLP
    projections); a value like 10 keeps attention from being nearly uniform.
    Deterministic for a given ``seed``. See the module docstring for loading on CPU.
    """
    import torch
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    root = os.path.abspath(root)
    tokenizer = build_tokenizer(os.path.join(root, "tokenizer"))
    clip_dir = build_clip(os.path.join(root, "clip"), image_size=image_size, seed=seed)
    model_dir = os.path.join(root, MODEL_FOLDER_NAME)

    torch.manual_seed(seed)
    config = LlavaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        use_cache=True,
    )
    model = LlavaLlamaForCausalLM(config)

    model_args = SimpleNamespace(
        vision_tower=clip_dir,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None,
        mm_patch_merge_type="flat",
        mm_projector_type="mlp2x_gelu",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    model.get_model().initialize_vision_modules(model_args)

    # The fields upstream's train.py writes into the config.
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_padding_side = tokenizer.padding_side
    model.config.tokenizer_model_max_length = tokenizer.model_max_length
    model.config.tune_mm_mlp_adapter = False
    model.config.freeze_mm_mlp_adapter = False
    model.config.mm_use_im_start_end = False
    model.config.mm_projector_lr = None
    model.config.mm_use_im_patch_token = False
    model.config.image_grid_pinpoints = None
    model.config.pad_token_id = tokenizer.pad_token_id

    if weight_scale != 1.0:
        with torch.no_grad():
            for param in model.get_model().layers.parameters():
                if param.dim() == 2:
                    param.mul_(weight_scale)

    # Upstream's loader builds the vision tower from config.mm_vision_tower; leaving its
    # weights out of the checkpoint avoids "unused weights" warnings on load.
    state_dict = {name: tensor for name, tensor in model.state_dict().items()
                  if ".vision_tower." not in name}
    os.makedirs(model_dir, exist_ok=True)
    model.save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


# ---------------------------------------------------------------------------------------
# images and data
# ---------------------------------------------------------------------------------------

def _random_scene(rng: random.Random, size: int) -> dict:
    """One to four shapes, each in its own quadrant, at a random place inside it."""
    count = rng.randint(1, 4)
    positions = sorted(rng.sample(POSITIONS, count), key=POSITIONS.index)
    shapes = []
    half = size // 2
    for position in positions:
        radius = rng.randint(size // 16, size // 6)
        x0 = half if position.endswith("right") else 0
        y0 = half if position.startswith("bottom") else 0
        cx = x0 + rng.randint(radius, half - radius)
        cy = y0 + rng.randint(radius, half - radius)
        shapes.append({
            "shape": rng.choice(SHAPES),
            "color": rng.choice(sorted(COLORS)),
            "position": position,
            "center": (cx, cy),
            "radius": radius,
        })
    background = rng.choice([(255, 255, 255), (235, 235, 235), (250, 245, 230)])
    return {"size": size, "background": background, "shapes": shapes}


def _draw_scene(scene: dict):
    from PIL import Image, ImageDraw

    size = scene["size"]
    image = Image.new("RGB", (size, size), scene["background"])
    draw = ImageDraw.Draw(image)
    for item in scene["shapes"]:
        cx, cy = item["center"]
        r = item["radius"]
        fill = COLORS[item["color"]]
        if item["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif item["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif item["shape"] == "rectangle":
            draw.rectangle([cx - r, cy - r // 2, cx + r, cy + r // 2], fill=fill)
        else:  # triangle
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _describe(item: dict) -> str:
    return f"{_a(item['color'])} {item['shape']} in the {item['position']}"


def _qa_pairs(rng: random.Random, scene: dict, k: int) -> list[tuple[str, str]]:
    """``k`` distinct question/answer pairs about a scene, in a random order."""
    shapes = scene["shapes"]
    by_position = {item["position"]: item for item in shapes}
    pairs = []
    listing = ", ".join(_describe(item) for item in shapes)
    pairs.append(("What is in the image?", f"The image shows {listing}."))
    n = len(shapes)
    noun = "shape" if n == 1 else "shapes"
    verb = "is" if n == 1 else "are"
    pairs.append(("How many shapes are in the image?",
                  f"There {verb} {NUMBER_WORDS[n]} {noun}."))
    for position in POSITIONS:
        item = by_position.get(position)
        if item is None:
            pairs.append((f"Is there a shape in the {position}?",
                          f"No, the {position} is empty."))
        else:
            pairs.append((f"What color is the shape in the {position}?",
                          f"The shape in the {position} is {item['color']}."))
            pairs.append((f"What shape is in the {position}?",
                          f"There is {_describe(item)}."))
    for color in sorted({item["color"] for item in shapes}):
        where = [item["position"] for item in shapes if item["color"] == color]
        pairs.append((f"Where is the {color} shape?",
                      f"The {color} shape is in the {' and the '.join(where)}."))
    rng.shuffle(pairs)
    return pairs[:k]


def make_images(out_dir: str, n: int, size: int = 336, seed: int = 0) -> list[str]:
    """Draw ``n`` PNGs of colored shapes into ``out_dir``; return their file names."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for index in range(n):
        name = f"img_{index:05d}.png"
        _draw_scene(_random_scene(rng, size)).save(os.path.join(out_dir, name))
        names.append(name)
    return names


def make_dataset(out_dir: str, n: int, seed: int = 0, multi_turn: bool = False,
                 size: int = 336) -> str:
    """Write ``n`` images and an upstream LLaVA JSON about them; return the JSON's path.

    The JSON is ``out_dir/dataset.json``; image names are relative to ``out_dir``, so pass
    ``--data_path out_dir/dataset.json --image_folder out_dir`` to upstream training. Each
    sample has one human/gpt exchange (as ``--version plain`` needs), or two to three with
    ``multi_turn=True``. The first human turn starts with ``"<image>\\n"``.
    """
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for index in range(n):
        scene = _random_scene(rng, size)
        name = f"img_{index:05d}.png"
        _draw_scene(scene).save(os.path.join(out_dir, name))
        rounds = rng.randint(2, 3) if multi_turn else 1
        conversations = []
        for turn, (question, answer) in enumerate(_qa_pairs(rng, scene, rounds)):
            if turn == 0:
                question = "<image>\n" + question
            conversations.append({"from": "human", "value": question})
            conversations.append({"from": "gpt", "value": answer})
        records.append({"id": f"tiny-{index:05d}", "image": name,
                        "conversations": conversations})
    path = os.path.join(out_dir, "dataset.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=1)
    return path


def prompt_ids(tokenizer, question: str, conv_mode: str = "vicuna_v1"):
    """Upstream's chat prompt for one image and ``question``, as a 1-D LongTensor.

    The image placeholder is ``IMAGE_TOKEN_INDEX`` (-200); add a batch dimension with
    ``.unsqueeze(0)`` before ``model.generate``.
    """
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX,
                                 return_tensors="pt")
