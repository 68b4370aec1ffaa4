"""side: split mode -- the device runs frozen forwards, a server trains a side network.

This method runs its own loop (`pocketllm.split.client.train_side`) instead of `Method.step`:
its step is not a function the training loop can call and wait for. The device's forward for
step t+1 runs while the server trains step t (a producer thread and a bounded queue), steps are
acknowledged asynchronously, and a lost connection rewinds the schedule to the server's last
acknowledged step, none of which fits a synchronous `step(batches) -> StepResult`. The class
below registers the name (so `pocketllm methods` lists it and `--method side` resolves) and
hands the run over.
"""

from __future__ import annotations

from .base import Method, fill_defaults, register


@register("side")
class SideTuning(Method):
    trainable_kinds = ("full", "lora")  # the backbone is frozen either way: --trainable is moot
    # AdamW on a freshly initialised side network: the usual rate for a small network trained
    # from scratch (not tuned here)
    defaults = {"full": {"learning_rate": 1e-3}, "lora": {"learning_rate": 1e-3}}

    @classmethod
    def run(cls, args) -> dict:
        from ..split.client import train_side
        fill_defaults(args, cls)
        return train_side(args)

    def step(self, batches, step, lr):
        raise NotImplementedError("--method side runs its own loop (SideTuning.run)")
