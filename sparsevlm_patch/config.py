"""Sparse configuration: presets, environment flags, validation.

A `SparseConfig` says where to prune (`pruning_layers`) and how many visual tokens
each of those layers keeps. Counts come either from a retain budget (the paper's
presets 192/128/96/64, defined for 576 visual tokens: scaled per 576 tokens for a sample with
more, counted in the sample's own tokens for one with fewer, so that a budget at or above a
sample's visual count keeps all of them) or from an absolute `keep_schedule` (clipped to each
sample's count).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .flags import CONFIG_KEYS, DEFAULTS, ENV_NAMES, SELECTIONS

# Keep counts at layers 2/6/15 of the public SparseVLM release, for 576 visual tokens.
PRESET_SCHEDULES = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
# SparseVLM v2.0's own (the fork's `score.py` under USE_VERSION=2_0).
PRESET_SCHEDULES_V2 = {
    192: (300, 200, 118),
    128: (238, 108, 60),
    96: (246, 54, 28),
    64: (66, 34, 20),
}
RULE_PRESETS = {"sparsevlm_v2": PRESET_SCHEDULES_V2}  # every other rule uses PRESET_SCHEDULES
RULE_RECYCLES = {"sparsevlm": True}  # a rule's default for `recycle` (off unless listed)
PRESET_VISUAL_TOKENS = 576
DEFAULT_LAYERS = DEFAULTS["pruning_layers"]
DEFAULT_RETAIN = 64

# Token recycling: the top RECYCLE_CANDIDATE_SHARE of the pruned tokens (by score) are
# clustered into ceil(kept / RECYCLE_KEPT_PER_CLUSTER) merged tokens.
RECYCLE_CANDIDATE_SHARE = 0.3
RECYCLE_KEPT_PER_CLUSTER = 10


@dataclass(frozen=True)
class SparseConfig:
    """What to prune. Build with `make_config`, which validates."""

    pruning_layers: Tuple[int, ...] = DEFAULT_LAYERS
    retain_tokens: Optional[int] = DEFAULT_RETAIN
    keep_schedule: Optional[Tuple[int, ...]] = None
    recycle: Optional[bool] = None  # None: the rule's default (on for sparsevlm only)
    selection: str = DEFAULTS["selection"]
    seed: int = DEFAULTS["seed"]
    cuda_graphs: bool = DEFAULTS["cuda_graphs"]

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is not a selection rule: expected one of "
                             f"{', '.join(SELECTIONS)}")
        if self.recycle is None:
            object.__setattr__(self, "recycle", RULE_RECYCLES.get(self.selection, False))

    def keep_counts(self, visual_count: int) -> Tuple[int, ...]:
        """Visual tokens kept at each pruning layer for a sample with `visual_count`."""
        if self.keep_schedule is not None:
            return tuple(min(k, visual_count) for k in self.keep_schedule)
        if visual_count == 0:
            return (0,) * len(self.pruning_layers)
        # More than 576 tokens (several images, anyres tiles): the budget is per 576 tokens.
        # Fewer (a smaller tower, e.g. 256 at 224 px): the budget counts the sample's own tokens,
        # so it reaches keep-all exactly at the sample's count, without a jump below it.
        retain = self.retain_tokens * max(1.0, PRESET_VISUAL_TOKENS / visual_count)
        scale = visual_count / PRESET_VISUAL_TOKENS
        base = retain_schedule(retain, len(self.pruning_layers),
                               RULE_PRESETS.get(self.selection, PRESET_SCHEDULES))
        return tuple(min(visual_count, int(round(k * scale))) for k in base)


def retain_schedule(retain: float, n_layers: int, presets: dict = PRESET_SCHEDULES) -> Tuple[int, ...]:
    """Keep counts (for 576 visual tokens) of a retain budget (fractional for a smaller tower).

    `presets` are the paper's (v1's or v2's). Other budgets interpolate linearly between the
    two nearest presets (above 192: towards keeping all 576; below 64: scaled down).
    """
    if n_layers != 3:
        # Spread the budget evenly: a constant count at every pruning layer.
        return tuple(min(PRESET_VISUAL_TOKENS, retain) for _ in range(n_layers))
    if retain in presets:
        return presets[retain]
    anchors = sorted(presets.items()) + [(PRESET_VISUAL_TOKENS, (576, 576, 576))]
    if retain < anchors[0][0]:
        lo_r, lo = anchors[0]
        return tuple(max(1, round(k * retain / lo_r)) for k in lo)
    if retain >= PRESET_VISUAL_TOKENS:
        return (PRESET_VISUAL_TOKENS,) * 3
    for (lo_r, lo), (hi_r, hi) in zip(anchors, anchors[1:]):
        if lo_r <= retain <= hi_r:
            t = (retain - lo_r) / (hi_r - lo_r)
            counts = [round(a + t * (b - a)) for a, b in zip(lo, hi)]
            # Interpolation between non-monotone neighbours must stay non-increasing.
            for i in range(1, 3):
                counts[i] = min(counts[i], counts[i - 1])
            return tuple(counts)
    raise AssertionError("unreachable")


def recycle_counts(pool: int, kept: int) -> int:
    """Number of merged tokens made from the `pool - kept` pruned tokens."""
    pruned = pool - kept
    if pruned <= 0 or kept <= 0:
        return 0
    candidates = math.ceil(RECYCLE_CANDIDATE_SHARE * pruned)
    return min(candidates, math.ceil(kept / RECYCLE_KEPT_PER_CLUSTER))


def recycle_candidates(pool: int, kept: int) -> int:
    pruned = pool - kept
    return math.ceil(RECYCLE_CANDIDATE_SHARE * pruned) if pruned > 0 else 0


# ----------------------------------------------------------------------------- parsing

def _parse_int(flag: str, value, allowed: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{flag}={value!r} is not valid: expected {allowed}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{flag}={value!r} is not a number: expected {allowed}") from None


def parse_int_list(flag: str, value) -> Tuple[int, ...]:
    """'2,6,15' or a sequence of ints -> tuple of ints."""
    allowed = "a comma-separated list of integers, e.g. 2,6,15"
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p != ""]
        if not parts:
            raise ValueError(f"{flag}={value!r} is empty: expected {allowed}")
        bad = [p for p in parts if not p.lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"{flag}={value!r}: {bad[0]!r} is not a number: expected {allowed}")
        return tuple(int(p) for p in parts)
    if isinstance(value, Sequence):
        if len(value) == 0:
            raise ValueError(f"{flag}={value!r} is empty: expected {allowed}")
        return tuple(_parse_int(flag, p, allowed) for p in value)
    raise ValueError(f"{flag}={value!r} is not valid: expected {allowed}")


def parse_bool(flag: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{flag}={value!r} is not valid: expected 1/0 (or true/false)")


def make_config(
    retain_tokens=None,
    pruning_layers=DEFAULT_LAYERS,
    keep_schedule=None,
    recycle=None,
    selection=DEFAULTS["selection"],
    seed=DEFAULTS["seed"],
    cuda_graphs=DEFAULTS["cuda_graphs"],
    *,
    num_layers: Optional[int] = None,
    names: Optional[dict] = None,
) -> SparseConfig:
    """Validate user values into a SparseConfig.

    `names` maps each argument to the flag name used in messages (the env variable or
    the command-line flag the value came from). `num_layers` (the model's depth) checks
    layer indices; without it only the form is checked.
    """
    names = {**{key: key for key in CONFIG_KEYS}, **(names or {})}
    rule = selection.strip() if isinstance(selection, str) else selection
    if rule not in SELECTIONS:
        raise ValueError(f"{names['selection']}={selection!r} is not a selection rule: expected one of "
                         f"{', '.join(SELECTIONS)}")
    seed_value = _parse_int(names["seed"], seed, "an integer")
    layers = parse_int_list(names["pruning_layers"], pruning_layers)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(
            f"{names['pruning_layers']}={_show(pruning_layers)} is not strictly increasing: "
            "expected increasing decoder layer indices, e.g. 2,6,15")
    if layers[0] < 1:
        raise ValueError(
            f"{names['pruning_layers']}={_show(pruning_layers)} contains layer {layers[0]}: "
            "pruning layers must be >= 1 (layer 0's KV cache must hold the whole prompt, "
            "generation reads the past length from it)")
    if num_layers is not None and layers[-1] >= num_layers:
        raise ValueError(
            f"{names['pruning_layers']}={_show(pruning_layers)} contains layer {layers[-1]}, "
            f"past the model's depth: allowed are 1..{num_layers - 1} "
            f"(the model has {num_layers} decoder layers)")

    schedule = None
    if keep_schedule is not None and retain_tokens is not None:
        raise ValueError(
            f"{names['retain_tokens']}={retain_tokens!r} and {names['keep_schedule']}="
            f"{_show(keep_schedule)} are both set: give a retain budget or an explicit "
            "schedule, not both")
    if keep_schedule is not None:
        schedule = parse_int_list(names["keep_schedule"], keep_schedule)
        if len(schedule) != len(layers):
            raise ValueError(
                f"{names['keep_schedule']}={_show(keep_schedule)} has {len(schedule)} counts "
                f"but {names['pruning_layers']} has {len(layers)} layers: expected one keep "
                "count per pruning layer")
        if any(k < 0 for k in schedule):
            raise ValueError(
                f"{names['keep_schedule']}={_show(keep_schedule)} has a negative count: "
                "expected counts >= 0")
        if any(b > a for a, b in zip(schedule, schedule[1:])):
            raise ValueError(
                f"{names['keep_schedule']}={_show(keep_schedule)} increases: expected a "
                "non-increasing schedule (a later layer can only keep fewer tokens)")
        retain = None
    else:
        allowed = "a positive number of tokens (presets: 192, 128, 96, 64)"
        retain = DEFAULT_RETAIN if retain_tokens is None else _parse_int(
            names["retain_tokens"], retain_tokens, allowed)
        if retain <= 0:
            raise ValueError(f"{names['retain_tokens']}={retain_tokens!r} is not valid: expected {allowed}")
    return SparseConfig(
        pruning_layers=layers,
        retain_tokens=retain,
        keep_schedule=schedule,
        recycle=None if recycle is None else parse_bool(names["recycle"], recycle),
        selection=rule,
        seed=seed_value,
        cuda_graphs=parse_bool(names["cuda_graphs"], cuda_graphs),
    )


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value)
    return ",".join(str(v) for v in value) if isinstance(value, Sequence) else repr(value)


def env_enabled(environ=os.environ) -> bool:
    return parse_bool("SPARSEVLM", environ.get("SPARSEVLM", "1"))  # the `sparse` flag (flags.py)


def config_from_env(environ=os.environ, num_layers: Optional[int] = None) -> SparseConfig:
    """The configuration the SPARSEVLM_* environment variables describe."""
    values = {key: environ[env] for key, env in ENV_NAMES.items() if env in environ}
    return make_config(**values, num_layers=num_layers, names=ENV_NAMES)
