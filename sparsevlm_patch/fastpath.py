"""The fast path (`cuda_graphs=True`): fixed-shape prefill, decode and vision tower, replayed
as CUDA graphs.

At batch 1 and 8 eager PyTorch is bound by the host's kernel launches, so pruning alone
does not make LLaVA faster there. With the fast path:
- a sparse prefill pads its batch to a prompt-length bucket (and its question to a rater
  bucket), so one captured graph serves every prompt of the bucket;
- `generate()` decodes over a *static* pruned cache: each layer's buffers hold the tokens
  it kept plus `max_new_tokens` slots, written in place, and one captured step serves every
  token of every generation of that batch size and bucket;
- the vision tower and projector (`encode_images`) replay one graph per batch size.
Off the GPU (or wherever capture can't serve) the same fixed-shape code runs eagerly, so
CPU tests cover it; cases it can't serve at all fall back to the dynamic path with a
warning once per reason. Graphs live on the model's state, so `enable()` (a new
configuration) drops them.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from transformers.cache_utils import Cache

LENGTH_BUCKET = 64  # prompt lengths round up to a multiple of this
RATER_BUCKET = 32  # question lengths (rater candidates) likewise
NEW_TOKENS_BUCKET = 32  # max_new_tokens likewise
MAX_LENGTH = 8192  # longer prompts take the dynamic path
MAX_SHAPES = 32  # captured shapes kept per model (least recently used ones go first)

_warned = set()


def note_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"sparsevlm_patch cuda_graphs: {message}", stacklevel=4)


def fallback(reason: str) -> None:
    """Say once per reason why a call took the dynamic path instead of the fast one."""
    note_once(f"{reason}; this call runs eagerly on the dynamic path")


def bucket(n: int, size: int) -> int:
    return max(size, math.ceil(n / size) * size)


def can_capture(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.is_grad_enabled()


def refusal(model, fast: "FastState") -> Optional[str]:
    """Why the fast path can't serve `model` at all (None: it can)."""
    if getattr(model.config, "_attn_implementation", "eager") == "flash_attention_2":
        return "flash_attention_2 unpads with host round-trips, which a captured graph can't hold"
    first = next(model.parameters())
    if fast.split_checked != (first.data_ptr(), first.device):  # once per placement of the weights
        fast.split = len({p.device for p in model.parameters()}) > 1
        fast.split_checked = (first.data_ptr(), first.device)
    if fast.split:
        return "the model is split over several devices"
    return None


@dataclass
class FastState:
    """Per-model graphs and buffers (on the model's SparseState)."""

    runners: Dict[tuple, "Runner"] = field(default_factory=dict)  # in order of last use
    decode: Dict[tuple, "DecodeBuffers"] = field(default_factory=dict)
    capture_seconds: float = 0.0
    graph_bytes: int = 0
    last_path: str = ""
    rope_tables: list = field(default_factory=list)  # every RoPE table a graph may read
    weights: tuple = ()
    split: bool = False  # the model's parameters sit on several devices
    split_checked: tuple = ()  # the weights' placement `split` was computed for
    # One replay at a time: graphs share one memory pool, and a runner's static inputs and
    # outputs are its own (threads of a model worker take turns; the GPU serialises them anyway).
    lock: threading.RLock = field(default_factory=threading.RLock)
    pool: object = None

    def track(self, model) -> None:
        """Graphs read the weights and the RoPE tables by address. When the weights move
        (`model.to(...)`) or upstream grows a RoPE table (a longer prompt than any before),
        the graphs captured so far are dropped; old RoPE tables stay alive for a generation
        still decoding on them."""
        layers = model.layers
        first = next(model.parameters())
        weights = (first.data_ptr(), first.dtype, first.device)
        table = layers[0].self_attn.rotary_emb.cos_cached
        if self.rope_tables and (self.rope_tables[-1][0] is not table or self.weights != weights):
            self.runners.clear()
            self.decode = {k: b for k, b in self.decode.items() if b.in_use}
        if not self.rope_tables or self.rope_tables[-1][0] is not table:
            self.rope_tables.append([layer.self_attn.rotary_emb.cos_cached for layer in layers]
                                    + [layer.self_attn.rotary_emb.sin_cached for layer in layers])
        self.weights = weights

    def report(self) -> dict:
        graphs = sum(r.graph is not None for r in self.runners.values())
        graphs += sum(getattr(b, "runner", None) is not None and b.runner.graph is not None
                      for b in self.decode.values())
        return {"path": self.last_path, "graphs": graphs,
                "prefill_shapes": sum(key[0] == "prefill" for key in self.runners),
                "capture_seconds": round(self.capture_seconds, 3),
                "graph_memory_mib": round(self.graph_bytes / 2 ** 20, 1)}


class Runner:
    """One fixed-shape function: replayed from a CUDA graph where capture serves, else eager.

    `fn(**inputs)` must read nothing but its input tensors (and the model's weights). The
    first call on a GPU captures it (after a warm-up on a side stream); every later call
    copies its inputs into the graph's static buffers and replays. Outputs are the graph's
    own tensors: the caller copies what it keeps past the next replay."""

    def __init__(self, fn: Callable, fast: FastState):
        self.fn, self.fast = fn, fast
        self.graph = self.static = self.out = None
        self.failed = False

    def __call__(self, capture: bool, **inputs):
        """Call with `fast.lock` held, until what is kept of the outputs has been copied."""
        if not capture or self.failed:
            return self.fn(**inputs)
        if self.graph is None and not self._capture(inputs):
            return self.fn(**inputs)
        for name, tensor in inputs.items():
            self.static[name].copy_(tensor)
        self.graph.replay()
        return self.out

    def _capture(self, inputs: dict) -> bool:
        start, before = time.perf_counter(), torch.cuda.memory_reserved()
        with torch.inference_mode(False):  # buffers later written in place under plain no_grad too
            self.static = {name: tensor.clone() for name, tensor in inputs.items()}
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn(**self.static)
            torch.cuda.current_stream().wait_stream(side)
            if self.fast.pool is None:
                self.fast.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.fast.pool, capture_error_mode="thread_local"):
                self.out = self.fn(**self.static)
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001  (any failure: this shape runs eagerly from now on)
            self.failed, self.static, self.out = True, None, None
            note_once(f"capture failed ({type(error).__name__}: {error}); this shape runs eagerly")
            return False
        self.graph = graph
        self.fast.capture_seconds += time.perf_counter() - start
        self.fast.graph_bytes += torch.cuda.memory_reserved() - before
        return True


def runner(fast: FastState, key: tuple, fn: Callable) -> Runner:
    """The runner of `key`, made on first use; past MAX_SHAPES, the least recently used goes."""
    found = fast.runners.pop(key, None)
    if found is None:
        found = Runner(fn, fast)
        if len(fast.runners) >= MAX_SHAPES:
            note_once(f"more than {MAX_SHAPES} shapes captured for one model (e.g. images of many sizes): "
                      "the least recently used graphs are dropped and captured again when needed")
            fast.runners.pop(next(iter(fast.runners)))
    fast.runners[key] = found  # most recently used last
    return found


# ----------------------------------------------------------------------------- static decode

def decode_attention_backends(device: torch.device):
    """SDPA backends for decode over a pruned cache. cuDNN attention plans anew for every
    new key length (100+ ms per step measured on an H200, torch 2.11), and a pruned cache
    has one length per stage: leave it out."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class DecodeBuffers:
    """Static per-layer KV buffers of one (batch, stage widths, new tokens) shape: stage s
    holds its `prefix[s]` prefill slots, then `new_tokens` decode slots."""

    @torch.inference_mode(False)  # written in place under inference_mode and plain no_grad alike
    def __init__(self, like_keys: List[torch.Tensor], layer_stage: List[int], prefix: List[int], new_tokens: int):
        B = like_keys[0].shape[0]
        device = like_keys[0].device
        self.layer_stage, self.prefix, self.new_tokens = list(layer_stage), list(prefix), new_tokens
        self.keys = [k.new_zeros(k.shape[:2] + (prefix[s] + new_tokens,) + k.shape[3:])
                     for k, s in zip(like_keys, layer_stage)]
        self.values = [k.clone() for k in self.keys]
        self.valid = [torch.zeros(B, p + new_tokens, dtype=torch.bool, device=device) for p in prefix]
        self.pos = [torch.zeros(B, p + new_tokens, dtype=torch.long, device=device) for p in prefix]
        self.slot = [torch.zeros(1, dtype=torch.long, device=device) for _ in prefix]
        self.in_use = False

    def load(self, cache) -> None:
        """Copy a prefill's PrunedCache into the prefix slots; clear the decode slots."""
        for i, s in enumerate(self.layer_stage):
            p = self.prefix[s]
            self.keys[i][:, :, :p].copy_(cache.key_cache[i])
            self.values[i][:, :, :p].copy_(cache.value_cache[i])
        for s, valid in enumerate(cache.stage_valid):
            self.valid[s][:, :self.prefix[s]].copy_(valid)
            self.valid[s][:, self.prefix[s]:] = False
            self.pos[s][:, :self.prefix[s]].copy_(cache.stage_pos[s])


class StaticPrunedCache(Cache):
    """The cache a fast-path `generate()` decodes over (see DecodeBuffers). Its buffers are
    written in place and serve the next generation of the same shape once this one's call
    has ended: using it after that is an error, never stale attention."""

    def __init__(self, buffers: DecodeBuffers, prompt_length: int):
        self.buffers, self.prompt_length, self.length = buffers, prompt_length, prompt_length
        self.expired = False
        self.in_sparse_forward = False

    @property
    def seen_tokens(self) -> int:
        return self.length

    def __len__(self) -> int:
        return len(self.buffers.keys)

    def __getitem__(self, layer_idx: int):
        return self.buffers.keys[layer_idx], self.buffers.values[layer_idx]

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        return self.length  # every layer has seen the whole prompt and every new token

    def get_max_length(self) -> Optional[int]:
        return None

    def get_usable_length(self, new_seq_length: int, layer_idx: Optional[int] = 0) -> int:
        if not self.in_sparse_forward:
            raise RuntimeError("this KV cache of a sparsevlm_patch fast-path generation can only be read by the "
                               "plugin's decode (was sparsevlm_patch.remove() called during the generation?)")
        return self.buffers.keys[layer_idx].shape[-2] - new_seq_length

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        b = self.buffers
        slot = b.slot[b.layer_stage[layer_idx]]
        b.keys[layer_idx].index_copy_(2, slot, key_states)
        b.values[layer_idx].index_copy_(2, slot, value_states)
        return b.keys[layer_idx], b.values[layer_idx]

    def reorder_cache(self, beam_idx):
        raise RuntimeError("beam search does not run on the fast path's static cache (the plugin routes it "
                           "to the dynamic path): please report this")

    def check(self) -> None:
        if self.expired:
            raise RuntimeError(
                "this KV cache came from a fast-path (cuda_graphs) generation that has ended, and its buffers "
                "now serve the next one: continue a generation with cuda_graphs off to keep its cache")


def decode_buffers(fast: FastState, cache, new_tokens: int) -> Optional[DecodeBuffers]:
    """Free static buffers for a prefill's cache shape, made on first use; None when the
    buffers of this shape are held by a generation in flight (another thread)."""
    prefix = [v.shape[1] for v in cache.stage_valid]
    k = cache.key_cache[0]
    key = (k.shape[0], tuple(prefix), new_tokens, k.dtype, k.device, tuple(cache.layer_stage))
    with fast.lock:
        buffers = fast.decode.get(key)
        if buffers is None:
            idle = [k for k, b in fast.decode.items() if not b.in_use]
            if len(idle) >= MAX_SHAPES:
                fast.decode.pop(idle[0])
            buffers = fast.decode[key] = DecodeBuffers(cache.key_cache, cache.layer_stage, prefix, new_tokens)
        if buffers.in_use:
            return None
        buffers.in_use = True
        return buffers


def decode_step(model, cache: StaticPrunedCache, embeds, position_ids, new_valid, step, window=None):
    """One decode step over a static pruned cache, on device tensors alone (what the decode
    graph captures). `step` [1]: the new token's index among the generated ones; slots past
    it are cleared first, so a cache can be continued again from an earlier point.
    `window`: the model's sliding window, where upstream applies one."""
    b = cache.buffers
    dtype = embeds.dtype
    masks = []
    for s, valid in enumerate(b.valid):
        slot = b.prefix[s] + step
        b.slot[s].copy_(slot)
        slots = torch.arange(valid.shape[1], device=valid.device)[None]
        valid.copy_((valid & (slots < slot)) | ((slots == slot) & new_valid))
        b.pos[s].copy_(torch.where(slots == slot, position_ids, b.pos[s]))
        allowed = valid if window is None else valid & (position_ids - b.pos[s] < window)
        mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, torch.finfo(dtype).min)
        masks.append(mask[:, None, None, :])
    hidden = embeds
    cache.in_sparse_forward = True
    try:
        with decode_attention_backends(embeds.device):
            for i, layer in enumerate(model.layers):
                hidden = layer(hidden, attention_mask=masks[b.layer_stage[i]], position_ids=position_ids,
                               past_key_value=cache, output_attentions=False, use_cache=True)[0]
    finally:
        cache.in_sparse_forward = False
    return model.norm(hidden)
