"""What bench_zero.py launches under `deepspeed`: `sparsevlm_patch/train.py` (upstream's
`train()` with the plugin) plus a callback that times the optimizer steps and, at the end,
writes each rank's step end times, peak GPU memory and whole-teacher size to
`<output_dir>/timing_rank<r>.json`. It also gives upstream's sampler a seeded generator so
that runs on 1 and 2 GPUs see the same data order. Nothing else differs from the plugin's own entry.
"""
import json
import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # the repo root, not benchmarks/, when run as a script

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.step_ends = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        from sparsevlm_patch.distill import SETUP_ATTR

        setup = self.trainer.__dict__.get(SETUP_ATTR)
        teacher = None if setup is None else setup.teacher
        cuda = torch.cuda.is_available()
        record = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "step_end_s": self.step_ends,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "teacher_parameters": None if teacher is None else sum(p.numel() for p in teacher.parameters()),
            "log_history": state.log_history,  # also here: upstream writes trainer_state.json later
        }
        with open(os.path.join(args.output_dir, f"timing_rank{args.process_index}.json"), "w") as handle:
            json.dump(record, handle)


def main() -> None:
    import sparsevlm_patch

    sparsevlm_patch.apply()
    from llava.train import llava_trainer

    init = llava_trainer.LLaVATrainer.__init__

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(StepTimer(self))

    llava_trainer.LLaVATrainer.__init__ = timed_init
    sampler = llava_trainer.LLaVATrainer._get_train_sampler

    def seeded_sampler(self):
        # Upstream's LengthGroupedSampler draws its order from the global RNG, which the set-up
        # consumes differently for 1 and 2 processes; its own seeded generator fixes the order.
        chosen = sampler(self)
        if getattr(chosen, "generator", False) is None:
            chosen.generator = torch.Generator().manual_seed(self.args.seed)
        return chosen

    llava_trainer.LLaVATrainer._get_train_sampler = seeded_sampler
    from sparsevlm_patch.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
