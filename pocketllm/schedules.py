"""Learning-rate and ZO-eps schedules: a value per step, from a start value to a final one.

    value(step) = start * shape(t) + final * (1 - shape(t)),   t = max(step / iters, spent)

with `shape` from the registry below (1 at the start, falling to 0 at the end), after an
optional linear warmup from 0 (learning rate only). `spent` is the fraction of a run's time
budget (`--time-budget`) used before the step, 0 without one: a schedule ends where the run
does, whichever of the two limits stops it. Why: a time-budgeted run stops long before
`--iters`, so a schedule over `--iters` alone never decays, and a normalised step (FZOO's,
whose length does not shrink with the gradient) keeps its full length to the end and
over-fits. Without a budget the values are pure functions of the step; with one they follow
the run's training clock, which a resumed run continues from its last save, and every
step's lr and eps are in the ZO log, so `pocketllm replay` is exact either way.
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
              warmup: int = 0, spent: float = 0.0) -> float:
    """The value of schedule `name` at `step` (0-based) of `iters`, `spent` (0-1) of the time
    budget used."""
    if name not in SHAPES:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(SHAPES)}")
    if warmup and step < warmup:
        return start * (step + 1) / warmup
    span = max(iters - warmup, 1)
    t = min(max(max(step - warmup, 0) / span, spent), 1.0)
    s = SHAPES[name](t)
    return start * s + final * (1.0 - s)  # exactly `start` where s = 1 (constant)


def lr_at(args, step: int, spent: float = 0.0) -> float:
    """--learning-rate under --lr-schedule (to --lr-final, after --lr-warmup steps)."""
    return scheduled(args.lr_schedule, args.learning_rate, args.lr_final, step, args.iters,
                     args.lr_warmup, spent)


def eps_at(cfg, step: int, iters: int, spent: float = 0.0) -> float:
    """--eps under --eps-schedule, to --eps-final (0: a tenth of --eps), over `iters` steps."""
    final = cfg.eps_final if cfg.eps_final > 0 else cfg.eps / 10
    return scheduled(cfg.eps_schedule, cfg.eps, final, step, iters, spent=spent)


def budget_spent(args, clock: float) -> float:
    """The fraction of --time-budget (minutes) that `clock` training seconds use; 0 without."""
    return min(clock / (60.0 * args.time_budget), 1.0) if args.time_budget else 0.0
