"""Fixes to upstream's training stack (transformers 4.37 / llava 1.2.2 on current torch and
DeepSpeed), each installed as a row of the patch table (hooks.py) and undone by `remove()`."""
from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import torch


@contextmanager
def _no_cuda_sync():
    """Upstream's save calls torch.cuda.synchronize() unconditionally; on CPU it is a no-op."""
    if torch.cuda.is_available():
        yield
    else:
        with mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None):
            yield


def safe_save(wrapped, instance, args, kwargs):
    """llava.train.train.safe_save_model_for_hf_trainer, runnable without CUDA."""
    with _no_cuda_sync():
        return wrapped(*args, **kwargs)


def _numpy_rng_types() -> list:
    import numpy as np

    reconstruct = getattr(getattr(np, "_core", np.core), "multiarray")._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_rng_state(wrapped, trainer, args, kwargs):
    """Trainer._load_rng_state: transformers 4.37 saves the RNG state with numpy arrays; torch
    >= 2.6 loads it with weights_only=True and refuses them. Allow exactly those numpy types,
    for this load only (never weights_only=False), so --resume_from_checkpoint works."""
    with torch.serialization.safe_globals(_numpy_rng_types()):
        return wrapped(*args, **kwargs)


def drop_empty_param_groups(wrapped, trainer, args, kwargs):
    """LLaVATrainer.create_optimizer: with `--mm_projector_lr` upstream makes four parameter
    groups, some empty under LoRA. DeepSpeed drops empty groups after the Trainer has built
    the LR scheduler on all four, so the scheduler's rates would land on the wrong groups
    (recent torch refuses the mismatch outright). Dropping them here, first, keeps both aligned.
    An optimizer the user passed in (`optimizers=`) is left as it is."""
    built_here = trainer.optimizer is None
    optimizer = wrapped(*args, **kwargs)
    if built_here:
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
    return optimizer


def integer_bucket_sizes(wrapped, instance, args, kwargs):
    """HfTrainerDeepSpeedConfig.trainer_config_finalize: transformers 4.37 fills ZeRO-3's "auto"
    stage3_prefetch_bucket_size (as in upstream LLaVA's scripts/zero3.json) with 0.9 x hidden^2,
    a float that DeepSpeed >= 0.15 refuses; the sizes count elements, so round them."""
    result = wrapped(*args, **kwargs)
    zero = instance.config.get("zero_optimization", {})
    for key in ("stage3_prefetch_bucket_size", "reduce_bucket_size", "stage3_param_persistence_threshold"):
        if isinstance(zero.get(key), float):
            zero[key] = int(zero[key])
    return result
