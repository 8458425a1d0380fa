"""The study's starting point, built offline from random weights ("from scratch").

* a small sentencepiece tokenizer trained on the task's own text, saved as a Llama tokenizer
  (the recipe of ``sparsevlm_patch.tiny.build_tokenizer``, on another corpus);
* a random, frozen ``CLIPVisionModel`` with the real 336 px / patch 14 geometry (576 tokens)
  plus its ``CLIPImageProcessor``, its position embeddings a 2-D sine-cosine table (smooth
  in 2-D, as a pretrained CLIP's are) or CLIP's random init;
* a random ``LlamaForCausalLM`` (the "Vicuna" of this study: upstream's training loads it
  into ``LlavaLlamaForCausalLM`` and adds the projector, as it does with Vicuna).

``locality_probe`` checks that the random CLIP's patch features say where and what: a
least-squares linear probe, fitted on some images and scored on others, reads each patch
token's grid cell and the color under that patch.
"""
from __future__ import annotations

import io
import os
from typing import Dict, Sequence

import torch


def build_tokenizer(out_dir: str, corpus, vocab_size: int = 600, whole_words: Sequence[str] = ()):
    """A BPE tokenizer trained on `corpus`; each of `whole_words` (after a space) is one piece."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    os.makedirs(out_dir, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        user_defined_symbols=["\u2581" + word for word in whole_words])
    vocab_file = os.path.join(out_dir, "tokenizer.model")
    with open(vocab_file, "wb") as handle:
        handle.write(buffer.getvalue())
    tokenizer = LlamaTokenizer(vocab_file=vocab_file, legacy=True, model_max_length=2048, padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def grid_position_table(side: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings, [side * side, dim]: half the channels code the row,
    half the column, at geometric frequencies (as in MAE). Nearby patches get similar vectors,
    so "which region" is close to linear in them."""
    if dim % 4:
        raise ValueError(f"grid_position_table: dim={dim} must be a multiple of 4")
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32),
                                torch.arange(side, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    angles = [coord.flatten()[:, None] * freq[None] for coord in (rows, cols)]
    return torch.cat([part for a in angles for part in (a.sin(), a.cos())], 1)


POSITIONS = ("random", "sincos")


def build_clip(out_dir: str, *, image_size: int = 336, patch_size: int = 14, hidden: int = 256,
               layers: int = 2, heads: int = 4, position: str = "random", pos_scale: float = 1.0,
               seed: int = 0) -> str:
    """A random CLIPVisionModel + processor.

    `position`: "random" keeps CLIP's random init of the position embeddings (std 0.02, times
    `pos_scale`); "sincos" puts a 2-D sine-cosine table there (times `pos_scale`, CLS at 0).
    A pretrained CLIP's position embeddings are smooth in 2-D; random ones are not, and on
    random ones no linear map (an attention head's query-key product) tells a grid cell's 64
    patches from the rest well.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if position not in POSITIONS:
        raise ValueError(f"build_clip: position={position!r}; expected one of {POSITIONS}")
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              projection_dim=hidden)
    torch.manual_seed(seed)
    model = CLIPVisionModel(config)
    table = model.vision_model.embeddings.position_embedding.weight
    with torch.no_grad():
        if position == "sincos":
            table[0] = 0.0
            table[1:] = grid_position_table(image_size // patch_size, hidden)
        table.mul_(pos_scale)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_llm(out_dir: str, tokenizer, *, hidden: int, layers: int, heads: int, intermediate: int,
              rope_theta: float = 10000.0, seed: int = 0) -> str:
    """A random Llama (the LLM to train from scratch), saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, rope_theta=rope_theta, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def locality_probe(clip_dir: str, image_paths, *, select_layer: int = -2, device="cpu",
                   dtype=torch.float16, train_fraction: float = 0.75) -> Dict[str, float]:
    """Held-out accuracy of linear probes on the frozen tower's patch features (the layer
    LLaVA reads): which grid cell a token lies in, and which color (or background) lies
    under it. Chance: 1/9 for the cell; for color, the majority class (background). The tower
    runs in `dtype`, as upstream's training runs it (fp16, or bf16 with --bf16)."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from task import COLORS

    model = CLIPVisionModel.from_pretrained(clip_dir).to(device=device, dtype=dtype).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    side = model.config.image_size // model.config.patch_size
    patch = model.config.patch_size
    palette = torch.tensor([COLORS[name] for name in sorted(COLORS)], dtype=torch.float32)  # [C, 3]
    import numpy as np

    feats, cell_y, color_y = [], [], []
    paths = list(image_paths)
    for start in range(0, len(paths), 16):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + 16]]
        pixels = processor.preprocess(images, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
        out = model(pixels, output_hidden_states=True)
        feats.extend(out.hidden_states[select_layer][:, 1:].float().cpu().unbind(0))  # [side*side, D] each
        for image in images:
            # Labels on the image as the tower sees it (resized to image_size): the grid cell
            # of each patch's centre, and the color covering most of the patch (0 = background).
            seen = np.asarray(image.resize((side * patch, side * patch)), dtype=np.float32)
            rgb = torch.from_numpy(seen.copy()).view(side, patch, side, patch, 3)
            rgb = rgb.permute(0, 2, 1, 3, 4).reshape(side * side, patch * patch, 3)
            close = (rgb[:, :, None, :] - palette[None, None]).abs().sum(-1) < 30  # [P, pix, C]
            best = close.float().mean(1).max(1)
            color_y.extend(torch.where(best.values > 0.5, best.indices + 1, 0).tolist())
            cell = ((torch.arange(side) + 0.5) * 3 / side).long().clamp(max=2)
            cell_y.extend((cell[:, None] * 3 + cell[None, :]).flatten().tolist())
    x = torch.cat(feats)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    n_train = int(len(feats) * train_fraction) * side * side
    result = {}
    for name, labels, classes in (("cell", cell_y, 9), ("color", color_y, len(COLORS) + 1)):
        y = torch.tensor(labels)
        onehot = torch.nn.functional.one_hot(y, classes).float()
        w = torch.linalg.lstsq(x[:n_train], onehot[:n_train], driver="gelsd").solution
        pred = (x[n_train:] @ w).argmax(1)
        result[f"{name}_probe_accuracy"] = float((pred == y[n_train:]).float().mean())
        result[f"{name}_majority_baseline"] = float(
            (y[n_train:] == torch.mode(y[:n_train]).values).float().mean())
    result["images"] = len(feats)
    result["feature_dim"] = int(feats[0].shape[1])
    return result
