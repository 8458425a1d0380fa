"""Run an unchanged upstream module or script with SparseVLM, then print what it pruned.

    python -m sparsevlm_patch.run -m llava.eval.model_vqa_loader --model-path ... [args]
    python -m sparsevlm_patch.run path/to/script.py [args]

The SPARSEVLM* environment variables configure the pruning, as for `import sparsevlm_patch`
(they are validated first: a bad value stops here with exit code 2, before the target runs).
The target runs as `__main__` with the `sys.argv` it expects. When it ends (normally, by
`sys.exit` or by an exception) an efficiency summary of its prefills goes to stderr.
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import sys

from .flags import FLAGS, usage_lines

# The runner's own switches (flags.py): each sets its environment variable to 1.
OPTIONS = {flag.runner: flag for flag in FLAGS if flag.runner}

USAGE = f"""\
usage: python -m sparsevlm_patch.run [{' '.join(OPTIONS)}] -m MODULE [ARGS ...]
       python -m sparsevlm_patch.run [{' '.join(OPTIONS)}] SCRIPT.py [ARGS ...]

Runs MODULE or SCRIPT.py unchanged, as __main__, with the SparseVLM hooks installed,
then prints an efficiency summary to stderr.
""" + "\n".join(f"  {name:<22} {flag.help} (= {flag.env}=1)" for name, flag in OPTIONS.items()) + f"""
Configure with the environment:
{usage_lines()}"""


class Tally:
    """Listener of `state.record`: sums up the stats dict of every prefill."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.prefills = 0
        self.sparse_prefills = 0
        self.visual = []    # visual tokens of each sample that had any
        self.kept = {}      # pruning layer -> kept visual tokens, one entry per such sample
        self.recycled = {}  # pruning layer -> recycled tokens, one entry per such sample
        self.flops_sparse = 0.0
        self.flops_dense = 0.0
        self.fast_path = None  # the latest prefill's fast-path report (cuda_graphs)

    def __call__(self, stats: dict) -> None:
        self.prefills += 1
        self.fast_path = stats.get("fast_path", self.fast_path)
        flops = stats["flops"]
        if "sparse" not in flops:  # text-only prefill: ran dense, nothing to prune
            return
        self.sparse_prefills += 1
        self.flops_sparse += flops["sparse"]
        self.flops_dense += flops["dense"]
        for b, visual in enumerate(stats["visual_tokens"]):
            if visual == 0:  # a sample without an image
                continue
            self.visual.append(visual)
            for i, layer in enumerate(stats["pruning_layers"]):
                self.kept.setdefault(layer, []).append(stats["kept_visual"][b][i])
                self.recycled.setdefault(layer, []).append(stats["recycled"][b][i])

    def summary(self) -> str:
        if self.sparse_prefills == 0:
            why = "" if self.enabled else "; SPARSEVLM=0, hooks not installed"
            return f"sparsevlm summary: no sparse prefill ({self.prefills} prefills seen{why})"
        lines = [
            f"sparsevlm summary: {self.sparse_prefills} sparse prefills "
            f"(of {self.prefills} prefills seen)",
            f"  visual tokens per sample (mean): {_mean(self.visual):.1f}",
            f"  kept visual tokens per pruning layer (mean per sample): {_per_layer(self.kept)}",
            f"  recycled tokens per pruning layer (mean per sample): {_per_layer(self.recycled)}",
        ]
        ratio = self.flops_sparse / self.flops_dense
        lines.append(f"  prefill FLOPs vs dense (analytic): {ratio:.3f} of dense "
                     f"({1 / ratio:.2f}x fewer)")
        if self.fast_path:
            fast = self.fast_path
            lines.append(f"  fast path (cuda_graphs): {fast['path']}; {fast['graphs']} CUDA graphs captured in "
                         f"{fast['capture_seconds']:.1f} s, {fast['graph_memory_mib']:.0f} MiB of graph memory; "
                         f"{fast['prefill_shapes']} prefill shapes")
        return "\n".join(lines)


def _mean(values) -> float:
    return sum(values) / len(values) if values else 0.0


def _per_layer(table: dict) -> str:
    return ", ".join(f"layer {layer}: {_mean(values):.1f}" for layer, values in table.items())


def _exit_usage(message: str) -> None:
    print(f"{USAGE}\n\nsparsevlm_patch.run: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(argv: list) -> tuple:
    """(kind, target, target args) from the runner's own arguments."""
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    while argv and argv[0] in OPTIONS:
        os.environ[OPTIONS[argv[0]].env] = "1"
        argv = argv[1:]
    if not argv:
        _exit_usage("no module or script given")
    first = argv[0]
    if first == "-m":
        if len(argv) < 2:
            _exit_usage("-m needs a module name")
        return "module", argv[1], argv[2:]
    if first.startswith("-m"):
        return "module", first[2:], argv[1:]
    if first.startswith("-"):
        _exit_usage(f"unknown option {first!r}")
    return "script", first, argv[1:]


def _configure() -> bool:
    """Validate the SPARSEVLM* environment and install the hooks; True when enabled."""
    from . import config, hooks

    try:
        enabled = config.env_enabled()
        config.config_from_env()  # checked with SPARSEVLM=0 too: nothing is silently ignored
        if enabled:
            hooks.apply()
    except ValueError as error:  # bad environment or unsupported upstream versions
        print(f"sparsevlm_patch.run: error: {error}", file=sys.stderr)
        sys.exit(2)
    return enabled


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def _run(kind: str, target: str, args: list) -> None:
    sys.argv = [target] + args
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        # As `python script.py` does: the script's folder comes first on sys.path.
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")


def main(argv=None) -> None:
    kind, target, args = _parse(sys.argv[1:] if argv is None else list(argv))
    enabled = _configure()
    if kind == "module" and not _module_exists(target):
        _exit_usage(f"no module named {target!r}")
    if kind == "script" and not os.path.isfile(target):
        _exit_usage(f"no such script: {target!r}")

    from . import state

    tally = Tally(enabled)
    state.add_listener(tally)
    try:
        _run(kind, target, args)
    finally:
        state.remove_listener(tally)
        sys.stdout.flush()
        print(tally.summary(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
