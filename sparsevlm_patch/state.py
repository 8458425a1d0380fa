"""Per-model sparse state, and the public per-model switches.

The state lives on the model's inner `LlamaModel` (LLaVA's `get_model()`), as a plain
attribute outside `state_dict`, so checkpoints never carry it. Models without a state
follow the environment's configuration when the hooks are installed with SPARSEVLM=1.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .config import DEFAULT_LAYERS, SparseConfig, config_from_env, env_enabled, make_config

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
    pending: object = None  # BatchLayout of the next forward, set by the multimodal hook
    # Training labels for choosing raters when the Trainer keeps them from the model
    # (label smoothing pops them): raters must never come from answers.
    rater_labels: Optional[torch.Tensor] = None
    keep_mask: Optional[torch.Tensor] = None
    stats: Optional[dict] = None

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


def _set_full_rope(inner, on: bool) -> None:
    # Compact batches carry original position ids beyond their own length: upstream's
    # attention must index the whole RoPE table, not its first kv_seq_len rows.
    for layer in getattr(inner, "layers", []):
        rotary = layer.self_attn.rotary_emb
        if on:
            setattr(rotary, FULL_ROPE_ATTR, True)
        else:
            rotary.__dict__.pop(FULL_ROPE_ATTR, None)


def _num_layers(inner) -> Optional[int]:
    return getattr(inner.config, "num_hidden_layers", None) if hasattr(inner, "config") else None


def enable(model, retain_tokens=None, pruning_layers=DEFAULT_LAYERS, recycle=True, keep_schedule=None):
    """Run `model` sparse with this configuration (overrides the environment's).

    `retain_tokens`: 192 / 128 / 96 / 64 (presets) or any number, None = 64; or
    `keep_schedule`: the visual tokens kept at each pruning layer, instead of a budget."""
    from .hooks import apply

    unwrapped = unwrap(model)
    if not hasattr(unwrapped, "get_vision_tower"):
        warnings.warn(f"sparsevlm_patch.enable: {type(unwrapped).__name__} is not a LLaVA model (it has "
                      "no vision tower, so no visual tokens to prune): it keeps running as upstream",
                      stacklevel=2)
    inner = language_model(model)
    config = make_config(retain_tokens, pruning_layers, keep_schedule, recycle,
                         num_layers=_num_layers(inner))
    apply()
    setattr(inner, STATE_ATTR, SparseState(config=config))
    _set_full_rope(inner, True)
    return model


def disable(model):
    """Run `model` exactly as upstream does (it keeps no sparse state)."""
    inner = language_model(model)
    setattr(inner, STATE_ATTR, SparseState(config=None, enabled=False))
    _set_full_rope(inner, False)
    return model


def state_for(model, auto: bool) -> Optional[SparseState]:
    """The model's state; with `auto`, a model never configured gets the environment's."""
    inner = language_model(model)
    state = inner.__dict__.get(STATE_ATTR)
    if state is None and auto and env_enabled():
        state = SparseState(config=config_from_env(num_layers=_num_layers(inner)))
        setattr(inner, STATE_ATTR, state)
        _set_full_rope(inner, True)
    return state


def last_keep_mask(model) -> Optional[torch.Tensor]:
    """bool [B, L] of the latest prefill: True where the token reached the last layer."""
    state = language_model(model).__dict__.get(STATE_ATTR)
    return None if state is None else state.keep_mask


def last_stats(model) -> Optional[dict]:
    """Kept visual tokens per pruning layer and sample, recycled counts, FLOPs vs dense."""
    state = language_model(model).__dict__.get(STATE_ATTR)
    return None if state is None else state.stats
