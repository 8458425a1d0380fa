"""Per-model sparse state, and the public per-model switches.

The state lives on the model's inner `LlamaModel` (LLaVA's `get_model()`), as a plain
attribute outside `state_dict`, so checkpoints never carry it. Models without a state
follow the environment's configuration when the hooks are installed with SPARSEVLM=1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import SparseConfig, config_from_env, env_enabled

STATE_ATTR = "_sparsevlm_state"
FULL_ROPE_ATTR = "_sparsevlm_full_rope_table"

# Called with the stats dict of every recorded prefill (e.g. by `python -m sparsevlm_patch.run`).
_listeners = []


def add_listener(fn) -> None:
    _listeners.append(fn)


def remove_listener(fn) -> None:
    _listeners.remove(fn)


@dataclass
class SparseState:
    config: Optional[SparseConfig]
    enabled: bool = True
    # Training labels for choosing raters when the Trainer keeps them from the model
    # (label smoothing pops them): raters must never come from answers.
    rater_labels: Optional[torch.Tensor] = None
    keep_mask: Optional[torch.Tensor] = None
    stats: Optional[dict] = None
    fast: object = None  # fastpath.FastState: graphs and static buffers of cuda_graphs=True

    def record(self, keep_mask: torch.Tensor, stats: dict) -> None:
        self.keep_mask, self.stats = keep_mask, stats
        for fn in list(_listeners):
            fn(stats)

    def clear(self) -> None:
        self.keep_mask = self.stats = None


def unwrap(model):
    """The LLaVA model inside DDP / DeepSpeed / peft wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def language_model(model):
    """The LlamaModel whose forward the hook replaces."""
    model = unwrap(model)
    return model.get_model() if hasattr(model, "get_model") else model


def mark_full_rope(inner) -> None:
    """Compact batches carry original position ids beyond their own length: upstream's
    attention must index the whole RoPE table, not its first kv_seq_len rows. The mark stays
    once a model has been sparse (also after `disable`): a decode over a cache pruned before
    `disable` still needs it, and the whole table holds the same values at every position,
    so upstream's outputs are unchanged."""
    for layer in getattr(inner, "layers", []):
        layer.self_attn.rotary_emb.__dict__[FULL_ROPE_ATTR] = True


def full_rope(rotary) -> bool:
    return FULL_ROPE_ATTR in rotary.__dict__


def num_layers(inner) -> Optional[int]:
    return getattr(inner.config, "num_hidden_layers", None) if hasattr(inner, "config") else None


def get_state(model) -> Optional[SparseState]:
    """The sparse state of `model` (any wrapper of it), None if never configured."""
    return language_model(model).__dict__.get(STATE_ATTR)


def configure(model, config: SparseConfig) -> None:
    """Run `model` sparse with `config` (data only: installs no hook)."""
    inner = language_model(model)
    inner.__dict__[STATE_ATTR] = SparseState(config=config)
    mark_full_rope(inner)


def disable(model):
    """Run `model` exactly as upstream does (it keeps no sparse state)."""
    language_model(model).__dict__[STATE_ATTR] = SparseState(config=None, enabled=False)
    return model


def state_for(model, auto: bool) -> Optional[SparseState]:
    """The model's state; with `auto`, a model never configured gets the environment's."""
    inner = language_model(model)
    state = inner.__dict__.get(STATE_ATTR)
    if state is None and auto and env_enabled():
        state = SparseState(config=config_from_env(num_layers=num_layers(inner)))
        inner.__dict__[STATE_ATTR] = state
        mark_full_rope(inner)
    return state


def last_keep_mask(model) -> Optional[torch.Tensor]:
    """bool [B, L] of the latest prefill: True where the token reached the last layer."""
    state = get_state(model)
    return None if state is None else state.keep_mask


def last_stats(model) -> Optional[dict]:
    """Kept visual tokens per pruning layer and sample, recycled counts, FLOPs vs dense."""
    state = get_state(model)
    return None if state is None else state.stats
