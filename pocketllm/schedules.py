"""Learning-rate and ZO-eps schedules: a value per step, from a start value to a final one.

    value(step) = start * shape(step / iters) + final * (1 - shape(step / iters))

with `shape` from the registry below (1 at the start, falling to 0 at the end), after an
optional linear warmup from 0 (learning rate only). Pure functions of the step, so a resumed
run gets the same values as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SHAPES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 1.0,
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
}


def scheduled(name: str, start: float, final: float, step: int, iters: int,
              warmup: int = 0) -> float:
    """The value of schedule `name` at `step` (0-based) of `iters`."""
    if name not in SHAPES:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(SHAPES)}")
    if warmup and step < warmup:
        return start * (step + 1) / warmup
    span = max(iters - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    s = SHAPES[name](t)
    return start * s + final * (1.0 - s)  # exactly `start` where s = 1 (constant)


def lr_at(args, step: int) -> float:
    """--learning-rate under --lr-schedule (to --lr-final, after --lr-warmup steps)."""
    return scheduled(args.lr_schedule, args.learning_rate, args.lr_final, step, args.iters,
                     args.lr_warmup)


def eps_at(cfg, step: int, iters: int) -> float:
    """--eps under --eps-schedule, to --eps-final (0: a tenth of --eps), over `iters` steps."""
    final = cfg.eps_final if cfg.eps_final > 0 else cfg.eps / 10
    return scheduled(cfg.eps_schedule, cfg.eps, final, step, iters)
