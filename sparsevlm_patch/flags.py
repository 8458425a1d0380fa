"""Every user-facing switch, defined once.

This table produces the environment names (`config_from_env`), the training flags (the
TrainingArguments subclass in distill.py), the `enable()` keywords (api.py), the runner's
usage text (run.py) and the README's flag table (`python -m sparsevlm_patch.flags`).
Values are validated by `SparseConfig` (config.py), never here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SELECTIONS = ("sparsevlm", "sparsevlm_v2", "fastv", "random")


@dataclass(frozen=True)
class Flag:
    key: str  # enable() keyword and SparseConfig field; for training-only flags, the trainer's
    env: Optional[str]  # environment variable, None = not configurable by the environment
    train: Optional[str]  # training flag (without "--"), None = not a training flag
    default: object
    help: str
    enable: bool = True  # an enable() keyword (and a SparseConfig field)
    train_type: type = str  # type the training parser gives (str: the plugin parses, with its messages)
    runner: Optional[str] = None  # the runner's own option, if it has one


FLAGS = (
    Flag("sparse", "SPARSEVLM", "sparse", True,
         "prune at all (1/0); the environment variable decides whether `import sparsevlm_patch` "
         "installs the hooks", enable=False, train_type=bool),
    Flag("retain_tokens", "SPARSEVLM_RETAIN", "retain_tokens", None,
         "visual-token budget: 192 / 128 / 96 / 64 (presets) or any number; default 64"),
    Flag("pruning_layers", "SPARSEVLM_LAYERS", "pruning_layers", (2, 6, 15),
         "decoder layers that prune, e.g. 2,6,15 (the default)"),
    Flag("keep_schedule", "SPARSEVLM_SCHEDULE", "keep_schedule", None,
         "visual tokens kept at each pruning layer, e.g. 66,30,17 (instead of a budget)"),
    Flag("recycle", "SPARSEVLM_RECYCLE", "token_recycling", None,
         "merge the best pruned tokens into a few (1/0); default: the rule's (on for sparsevlm only)",
         train_type=Optional[bool]),
    Flag("selection", "SPARSEVLM_SELECTION", "token_selection", "sparsevlm",
         "selection rule: " + ", ".join(SELECTIONS) + " (default sparsevlm)"),
    Flag("seed", "SPARSEVLM_SEED", "selection_seed", 0,
         "seed of the random rule (the same input gives the same selection); default 0"),
    Flag("cuda_graphs", "SPARSEVLM_CUDA_GRAPHS", None, False,
         "fast inference path: fixed-shape prefill, static-cache decode and vision tower, replayed as "
         "CUDA graphs on a GPU (1/0, default 0; see README, Fast path)", runner="--cuda-graphs"),
    Flag("teacher_model_name_or_path", None, "teacher_model_name_or_path", None,
         "frozen dense teacher (default: --model_name_or_path)", enable=False, train_type=Optional[str]),
    Flag("align_loss_weight", None, "align_loss_weight", None,
         "weight of the student-teacher hidden-state MSE; 0 loads no teacher. Default 1.0, or 0 with "
         "--sparse False (upstream's own training)", enable=False, train_type=Optional[float]),
)

BY_KEY = {flag.key: flag for flag in FLAGS}
CONFIG_KEYS = tuple(flag.key for flag in FLAGS if flag.enable)
ENV_NAMES = {flag.key: flag.env for flag in FLAGS if flag.enable and flag.env}
TRAIN_NAMES = {flag.key: "--" + flag.train for flag in FLAGS if flag.train}
DEFAULTS = {flag.key: flag.default for flag in FLAGS}


def usage_lines() -> str:
    """The environment part of the runner's usage text."""
    return "\n".join(f"  {flag.env:<22} {flag.help}" for flag in FLAGS if flag.env)


def markdown_table() -> str:
    """The README's flag table."""
    rows = ["| `enable(model, ...)` | environment | training flag | runner | meaning |",
            "|---|---|---|---|---|"]
    for flag in FLAGS:
        cells = [f"`{flag.key}`" if flag.enable else "",
                 f"`{flag.env}`" if flag.env else "",
                 f"`--{flag.train}`" if flag.train else "",
                 f"`{flag.runner}`" if flag.runner else "",
                 flag.help]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
