"""SparseVLM visual-token pruning and distillation for an unchanged, installed LLaVA.

    import sparsevlm_patch          # installs the hooks (not with SPARSEVLM=0 in the env)
    sparsevlm_patch.enable(model, retain_tokens=64)
    model.generate(input_ids, images=images, image_sizes=sizes, max_new_tokens=32)
    sparsevlm_patch.last_stats(model)
"""
from .config import SparseConfig, env_enabled
from .hooks import apply, remove
from .state import disable, enable, last_keep_mask, last_stats

__all__ = ["SparseConfig", "apply", "remove", "enable", "disable", "last_keep_mask", "last_stats"]
__version__ = "0.1.0"

if env_enabled():
    apply()
