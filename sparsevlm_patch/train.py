"""Distillation training through upstream's unchanged `llava.train.train.train()`.

    python -m sparsevlm_patch.train <upstream flags> --retain_tokens 64 --align_loss_weight 1.0
    deepspeed sparsevlm_patch/train.py <upstream flags> --deepspeed zero2.json

The hooks give upstream's parser the sparse flags (a TrainingArguments subclass put in
place of upstream's, so `--help` lists them and unknown flags still fail as upstream),
and give LLaVATrainer the distillation loss. `import sparsevlm_patch` followed by
upstream's `train()` (what `train_mem.py` does) gets the same. This module is only an
entry: nothing in the package imports it.
"""
import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script (deepspeed launcher): don't let our modules shadow others


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
