"""SparseVLM visual-token pruning and distillation for an unchanged, installed LLaVA.

    import sparsevlm_patch          # installs the hooks (not with SPARSEVLM=0 in the env)
    sparsevlm_patch.enable(model, retain_tokens=64)
    model.generate(input_ids, images=images, image_sizes=sizes, max_new_tokens=32)
    sparsevlm_patch.last_stats(model)
"""
import sys

from .api import disable, enable, last_keep_mask, last_stats
from .config import SparseConfig, config_from_env, env_enabled
from .hooks import apply, remove

__all__ = ["SparseConfig", "apply", "remove", "enable", "disable", "last_keep_mask", "last_stats"]
__version__ = "0.1.0"


def _runner_starting() -> bool:
    """True while `python -m sparsevlm_patch.run` imports this package to find the runner
    (sys.argv[0] is "-m" until then): the runner applies the environment itself, so that a
    bad value ends as a usage error (exit code 2) instead of a traceback."""
    argv = getattr(sys, "orig_argv", [])
    return sys.argv[:1] == ["-m"] and ("sparsevlm_patch.run" in argv or "-msparsevlm_patch.run" in argv)


if not _runner_starting():
    if env_enabled():
        apply()
    else:
        config_from_env()  # unused while SPARSEVLM=0, but a bad value is never silently ignored
