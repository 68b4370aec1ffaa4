"""The `Perturbation` seam: how a zeroth-order step draws z for each trainable tensor.

Query j of a step perturbs trainable tensor i along z_i(keys[j][i]), and the update moves it
along the same z (`zo.optim.Estimate`: g_hat = (1/q) sum_j g_j z(keys[j])). The default, `dense`,
is today's z: the counter-based noise of the key over the whole tensor (`zo.noise`), built and
applied by the fused kernel. Another perturbation changes what z is (a masked subset of the
coordinates, a low-rank matrix), and everything that reads z goes through it: the engine's
perturbed copies, the deferred update, the ZO optimizers' dense g_hat and the log's replay. So
the update is always the direction that was probed.

z may depend on the keys, the perturbation's settings and the current weights (sparse: their
magnitudes), never on anything a replay of the log cannot rebuild; the log's header records the
perturbation's `spec`, so `pocketllm replay` and `--resume` rebuild it, and the weights, exactly.
A perturbation with state (hizoo's diagonal estimate) updates it in `observe` from figures the
step logs, so a replay rebuilds the state too.

A new perturbation is one file in this folder with a `@register("name")` class and one import
line in `__init__.py`; tests/zo/test_perturbations.py then checks it (its update moves the
weights along its own z, batched and sequential evaluations agree, a run replays exactly).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from ...registry import Registry

REGISTRY = Registry("perturbation")
register = REGISTRY.register

# A perturbation key: the int of `zo.log.KeySpace`, or a tuple when z needs more than one
# stream (lowrank: U's key and its subspace V's). Keys are compared with ==: a +eps/-eps pair
# of one key is built in one pass over the weights.
Key = int | tuple[int, ...]


def _f32(c: float) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32)


class Perturbation(ABC):
    """z for each of the trainable tensors `params` (drawn with noise distribution `dist`).

    Every operation follows `zo.noise`'s arithmetic: float32 `w + (c * z)`, c rounded to
    float32, the result rounded to w's dtype. Subclasses define `z` (and may override the
    others for speed); the fused noise kernel is `dense`'s alone."""

    name = "?"
    flags: dict[str, str] = {}  # setting -> the ZO run setting (ZOConfig field) it comes from
    # True: the engine may fuse a queued update into the kernel call that builds the next
    # perturbed copies (dense); False: queued updates are applied first, then the copies built
    fused = False
    # Figures of the step's log record (reported by the estimator, `Estimator.reports`) this
    # perturbation's state is updated from after each step (`observe`); () for a stateless one
    needs: tuple[str, ...] = ()
    # True: z is a function of the key (and the settings) alone, the same at any weights and
    # at any step, which an anchored estimator (svrg) needs: it probes a step's z at its anchor
    # as well as at the current weights, and applies the anchor's z steps after probing it
    key_only = False
    # the state it keeps, for `pocketllm memory`: (what, copies, of what), as
    # `ZOOptimizer.memory` declares it
    memory: tuple[tuple[str, int, str], ...] = ()

    def __init__(self, params: Sequence[torch.Tensor] = (), dist: str = "gaussian", **settings):
        self.check(**settings)
        self.params, self.dist, self.settings = list(params), dist, settings

    @classmethod
    def check(cls, **settings) -> None:
        """Refuse settings this perturbation cannot work with (a ValueError naming the flag)."""

    def spec(self) -> dict:
        """What a log header records to rebuild this perturbation."""
        return {"name": self.name, **self.settings}

    def keys(self, space, step: int, queries: int, n: int) -> list[list[Key]]:
        """keys[j][i]: the key of tensor i in query j of step `step` (`space`: the run's
        `zo.log.KeySpace`)."""
        return space.keys(step, queries, n)

    def observe(self, keys: list[list[Key]], record: dict) -> None:
        """Update the state z depends on from a finished step (its keys and its log record,
        which holds `needs`), after the step's update has been applied: in training and when
        the log is replayed alike, so the state, and every later z, is rebuilt exactly."""

    # ---- z --------------------------------------------------------------------------------
    @abstractmethod
    def z(self, i: int, key: Key, w: torch.Tensor, start: int = 0) -> torch.Tensor:
        """z of tensor i at the elements of `w`: the tensor itself or a contiguous slice of it
        (its flat elements start .. start + w.numel() - 1; the current weights there). float32,
        shaped like `w`."""

    def z_rows(self, i: int, key: Key, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """z of the rows `rows` (int64, any shape) of the 2-D tensor i (`w`, all of it):
        (rows.numel(), w.shape[1]) float32. Default: all of z, then the rows."""
        return self.z(i, key, w)[rows.reshape(-1)]

    # ---- applying it ------------------------------------------------------------------------
    @torch.no_grad()
    def add_(self, i: int, w: torch.Tensor, updates: Sequence[tuple[Key, float]]) -> None:
        """w += coef * z(key) for each (key, coef) of one step, in order, in place. Every z is
        drawn from the weights before the first of them (a step's queries probed those)."""
        zs = [self.z(i, k, w) for k, _ in updates]
        flat = w.view(-1)
        for z, (_, c) in zip(zs, updates):
            if c != 0:
                flat.copy_((flat.float() + z.view(-1) * _f32(c)).to(w.dtype))

    @torch.no_grad()
    def perturb_pair(self, i: int, w: torch.Tensor, key: Key, start: int, scale: float,
                     out_plus: torch.Tensor, out_minus: torch.Tensor | None = None,
                     update_key: Key | None = None, update_coef: float = 0.0) -> None:
        """out_plus = w + scale z, out_minus = w - scale z (None: not written), for the slice
        `w` of tensor i at `start`. A fused perturbation first applies the update
        (update_key, update_coef) to w in place; the others never get one."""
        if update_key is not None and update_coef != 0:
            raise RuntimeError(f"perturbation {self.name} does not fuse updates")
        wf = w.reshape(-1).float()
        if scale == 0:  # the unperturbed replica: no z to draw
            d = torch.zeros_like(wf)
        else:
            d = self.z(i, key, w, start).view(-1) * _f32(scale)
        out_plus.view(-1).copy_((wf + d).to(w.dtype))
        if out_minus is not None:
            out_minus.view(-1).copy_((wf - d).to(w.dtype))

    @torch.no_grad()
    def perturb_rows(self, i: int, w: torch.Tensor, rows: torch.Tensor, key: Key, scale: float,
                     out: torch.Tensor) -> None:
        """out = rows `rows` of w + scale z (an embedding lookup of the perturbed table)."""
        r = rows.reshape(-1)
        wf = w[r].float()
        if scale != 0:
            wf = wf + self.z_rows(i, key, w, r) * _f32(scale)
        out.view(-1).copy_(wf.to(w.dtype).view(-1))


def spec_from_args(cfg) -> dict:
    """The perturbation named by --zo-perturbation with its settings from the run's settings
    (each perturbation's `flags`: setting -> run setting)."""
    cls = REGISTRY.lookup(cfg.zo_perturbation)  # an unknown name fails here, naming the choices
    return {"name": cfg.zo_perturbation, **{s: getattr(cfg, f) for s, f in cls.flags.items()}}


def build(spec: dict, params: Sequence[torch.Tensor], dist: str) -> Perturbation:
    """The perturbation a spec (from `spec_from_args` or a log header) describes, over
    `params` (the trainable tensors, in the log's order, at the start of training)."""
    spec = dict(spec)
    return REGISTRY.lookup(spec.pop("name"))(params, dist, **spec)
