"""Which training examples each simulated device holds (`--partition`).

`iid`: a seeded shuffle dealt round-robin. `dirichlet:ALPHA`: per label, the examples split
among the devices by proportions drawn from Dirichlet(ALPHA) (the usual non-IID benchmark;
small ALPHA: each device sees few labels), redrawn until every device holds one example.
Examples without a label (plain records) are one class. A new scheme is a function
`(labels, n, seed, param) -> [indices per device]` in `SCHEMES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def iid(labels: Sequence, n: int, seed: int, param: float | None) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(len(labels)).tolist()
    return [sorted(order[d::n]) for d in range(n)]


def dirichlet(labels: Sequence, n: int, seed: int, alpha: float | None) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    classes: dict = {}
    for i, y in enumerate(labels):
        classes.setdefault(y, []).append(i)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n)]
        for idx in classes.values():
            idx = rng.permutation(idx).tolist()
            cuts = (np.cumsum(rng.dirichlet([alpha] * n)) * len(idx)).astype(int)[:-1]
            for d, chunk in enumerate(np.split(np.array(idx, dtype=int), cuts)):
                parts[d] += chunk.tolist()
        if all(parts):
            return [sorted(p) for p in parts]
    raise ValueError(f"--partition dirichlet:{alpha:g} left a device without examples in 100 "
                     f"draws ({len(labels)} examples, {n} devices): use fewer --clients, more "
                     "data or a larger alpha")


SCHEMES: dict[str, tuple[Callable, bool]] = {"iid": (iid, False), "dirichlet": (dirichlet, True)}


def parse(text: str) -> tuple[str, float | None]:
    """`iid` or `dirichlet:ALPHA` (ALPHA > 0) as (scheme, parameter); ValueError otherwise."""
    name, _, arg = text.partition(":")
    if name not in SCHEMES:
        raise ValueError(f"--partition {text!r}: expected one of "
                         f"{', '.join(k + (':ALPHA' if SCHEMES[k][1] else '') for k in SCHEMES)}")
    if not SCHEMES[name][1]:
        if arg:
            raise ValueError(f"--partition {name} takes no parameter, got {text!r}")
        return name, None
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if not (value > 0 and np.isfinite(value)):
        raise ValueError(f"--partition {text!r}: {name} needs a finite ALPHA > 0, e.g. "
                         f"{name}:0.5")
    return name, value


def split(labels: Sequence, n: int, spec: str, seed: int) -> list[list[int]]:
    """The example indices of each of `n` devices under `spec`."""
    name, param = parse(spec)
    if len(labels) < n:
        raise ValueError(f"{len(labels)} training examples cannot be split among {n} devices")
    return SCHEMES[name][0](labels, n, seed, param)
