"""Distillation training through upstream's unchanged `llava.train.train.train()`.

    python -m sparsevlm_patch.train <upstream flags> --retain_tokens 64 --align_loss_weight 1.0
    deepspeed sparsevlm_patch/train.py <upstream flags> --deepspeed zero2.json

The hooks give upstream's parser the sparse flags (a TrainingArguments subclass put in
place of upstream's, so `--help` lists them and unknown flags still fail as upstream),
and give LLaVATrainer the distillation loss. `import sparsevlm_patch` followed by
upstream's `train()` (what `train_mem.py` does) gets the same.
"""
import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script (deepspeed launcher): don't let our modules shadow others

from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Optional  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402


def training_arguments_class(base):
    """Upstream's TrainingArguments plus the sparse and distillation flags."""
    from sparsevlm_patch.distill import check_flags

    @dataclass
    class TrainingArguments(base):
        sparse: bool = field(default=True, metadata={"help": "Prune the student's visual tokens (SparseVLM)."})
        # A string, so that a bad value gets the plugin's message (what is allowed), not argparse's.
        retain_tokens: Optional[str] = field(default=None, metadata={
            "help": "Visual-token budget: 192, 128, 96, 64 (presets) or a number; default 64."})
        pruning_layers: Optional[str] = field(default=None, metadata={
            "help": "Decoder layers that prune, e.g. 2,6,15 (the default)."})
        keep_schedule: Optional[str] = field(default=None, metadata={
            "help": "Visual tokens kept at each pruning layer, e.g. 66,30,17 (instead of --retain_tokens)."})
        token_recycling: bool = field(default=True, metadata={"help": "Merge the best pruned tokens into a few."})
        teacher_model_name_or_path: Optional[str] = field(default=None, metadata={
            "help": "Frozen dense teacher (default: --model_name_or_path)."})
        align_loss_weight: Optional[float] = field(default=None, metadata={
            "help": "Weight of the student-teacher hidden-state MSE; 0 loads no teacher. Default 1.0, "
                    "or 0 with --sparse False (upstream's own training)."})

        def __post_init__(self):
            check_flags(self)  # before any model is loaded
            super().__post_init__()

    # Picklable (the Trainer saves its args): a module attribute under the class's own name.
    TrainingArguments.__name__ = TrainingArguments.__qualname__ = "SparseTrainingArguments"
    globals()["SparseTrainingArguments"] = TrainingArguments
    return TrainingArguments


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


def allow_numpy_rng_state() -> None:
    """transformers 4.37 saves the RNG state with numpy arrays; torch >= 2.6 loads it with
    weights_only=True and refuses them. Allow exactly those numpy types (never
    weights_only=False), so --resume_from_checkpoint works."""
    import numpy as np

    reconstruct = getattr(getattr(np, "_core", np.core), "multiarray")._reconstruct
    allowed = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    torch.serialization.add_safe_globals(allowed)


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


def main() -> None:
    import sparsevlm_patch

    sparsevlm_patch.apply()
    from llava.train import train as llava_train

    llava_train.train()
    close_process_group()


def close_process_group() -> None:
    """Upstream's `train()` returns with the launcher's process group still open. A rank that
    finishes saving first then tears down gloo's threads while its peers still talk, which can
    abort it at exit ("terminate called without an active exception"); wait for all ranks, then
    close the group before the interpreter exits. (A rank that raised never gets here; the
    launchers, torchrun and deepspeed, then stop the ranks waiting at the barrier.)"""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
