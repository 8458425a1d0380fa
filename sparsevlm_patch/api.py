"""The public per-model switches (`sparsevlm_patch.enable` and friends)."""
from __future__ import annotations

import inspect
import warnings

from . import hooks, state
from .config import make_config
from .families import check_prunable
from .flags import CONFIG_KEYS, DEFAULTS

# enable(model, retain_tokens=None, pruning_layers=(2, 6, 15), recycle=None, keep_schedule=None,
#        selection="sparsevlm", seed=0): the keywords and defaults of flags.FLAGS.
_ORDER = ("retain_tokens", "pruning_layers", "recycle", "keep_schedule")
_KEYWORDS = _ORDER + tuple(k for k in CONFIG_KEYS if k not in _ORDER)
ENABLE_SIGNATURE = inspect.Signature(
    [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DEFAULTS[key]) for key in _KEYWORDS])


def enable(*args, **kwargs):
    """Run `model` sparse with this configuration (overrides the environment's).

    `retain_tokens`: 192 / 128 / 96 / 64 (presets) or any number, None = 64; or
    `keep_schedule`: the visual tokens kept at each pruning layer, instead of a budget.
    `selection`: "sparsevlm" (default), "sparsevlm_v2", "fastv" or "random" (seeded by `seed`);
    `recycle`: None = the rule's default (on for sparsevlm only). Returns `model`."""
    try:
        bound = ENABLE_SIGNATURE.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"sparsevlm_patch.enable: {error}; the keywords are {', '.join(_KEYWORDS)}") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    model = values.pop("model")
    unwrapped = state.unwrap(model)
    # Before anything is configured: a LLaVA whose LM has no sparse forward would run dense.
    check_prunable(unwrapped, "sparsevlm_patch.enable",
                   "Without enable(), the model runs as upstream.")
    if not hasattr(unwrapped, "get_vision_tower"):
        warnings.warn(f"sparsevlm_patch.enable: {type(unwrapped).__name__} is not a LLaVA model (it has "
                      "no vision tower, so no visual tokens to prune): it keeps running as upstream",
                      stacklevel=2)
    config = make_config(**values, num_layers=state.num_layers(state.language_model(model)))
    hooks.apply()
    state.configure(model, config)
    return model


enable.__signature__ = ENABLE_SIGNATURE
disable = state.disable
last_keep_mask = state.last_keep_mask
last_stats = state.last_stats
