"""Zeroth-order optimizers, by name (`--zo-optimizer`), shared by zo-sgd and prge.

A ZO step yields an estimate held as seeds: q queries, query j with its keys (one per trainable
tensor, from `pocketllm.zo.log.KeySpace`) and its projected gradient g_j, so that

    g_hat_i = (1/q) sum_j g_j z(keys[j][i])          (z regenerated from the key, never stored)

z is the run's perturbation's (`pocketllm.zo.perturbations`; dense noise by default): the
update moves the weights along the very z the step probed.

* `sgd`: w -= lr g_hat, applied as q seeded updates (no state; the Perturber fuses them into
  the next step's perturbation, so this works on full parameters at inference memory).
* `momentum`: heavy-ball, m = beta m + g_hat, w -= lr m.
* `adam`: Adam's two moments with bias correction.
* `sign-sgd`: w -= lr sign(g_hat).
* `conservative`: the sgd step is kept only if it lowers the loss of the step's batch
  (re-evaluated after the step: two extra forwards; the pre-step weights are kept as a copy).

`momentum`, `adam` and `sign-sgd` build g_hat as a dense float32 tensor per trainable tensor, and
the first two hold state of that size: meant for LoRA adapters (a few MB), not full parameters.
Every optimizer is a deterministic function of the logged (keys, projected gradients, lr) and,
for `conservative`, the logged decision: replaying the log rebuilds both the weights and the
optimizer state bit for bit (`--resume`, `pocketllm replay`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..registry import Registry
from .perturbations import Key, Perturbation
from .perturbations.dense import Dense as DenseZ

# updates as (keys of every tensor, coefficient): p_i += coef * z(keys[i])
Seeded = list[tuple[list[Key], float]]


@dataclass
class Estimate:
    """A ZO gradient estimate as seeds: per query its keys (per tensor) and projected grad,
    g_hat = (1/q) sum_j grads[j] z(keys[j]), z drawn as `perturbation` says (None: dense noise
    of distribution `dist`). q is the step's number of queries (`queries`; 0: one per entry);
    an anchored estimator (svrg) adds its anchor's q entries to the step's q, each along its
    own keys, under the same 1/q."""

    keys: list[list[Key]]
    grads: list[float]
    dist: str = "gaussian"
    perturbation: Perturbation | None = None
    queries: int = 0

    def __post_init__(self):
        if self.perturbation is None:
            self.perturbation = DenseZ((), self.dist)

    @property
    def q(self) -> int:
        """The step's number of queries: g_hat's 1/q (the first q entries are the step's)."""
        return self.queries or len(self.grads)

    def coefs(self, lr: float) -> list[float]:
        """Each query's coefficient in w -= lr g_hat."""
        return [-lr * g / self.q for g in self.grads]

    def dense(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """g_hat of tensor i (`w`: its current weights, which a perturbation's z may depend
        on) as a float32 tensor shaped like it."""
        out = torch.zeros(w.numel(), dtype=torch.float32)
        for k, g in zip(self.keys, self.grads):
            out.add_(self.perturbation.z(i, k[i], w.data).reshape(-1), alpha=g / self.q)
        return out.view(w.shape)


@dataclass
class Target:
    """What an optimizer acts on: the tensors, how seeded updates reach them (deferred into
    the next perturbation while training, at once when replaying) and, while training, the
    loss of the step's batch at the current weights (pending updates applied first)."""

    params: list[torch.Tensor]
    seeded: Callable[[Seeded], None]
    loss: Callable[[], float] | None = None


def immediate(params: Sequence[torch.Tensor], dist: str,
              perturbation: Perturbation | None = None) -> Target:
    """A target that applies seeded updates at once, in order (replay); z drawn as
    `perturbation` says (None: dense)."""
    params = list(params)
    pert = perturbation if perturbation is not None else DenseZ(params, dist)

    def apply(updates: Seeded) -> None:
        with torch.no_grad():
            for i, p in enumerate(params):
                pert.add_(i, p.data, [(keys[i], coef) for keys, coef in updates])
    return Target(params, apply)


REGISTRY = Registry("ZO optimizer")
register = REGISTRY.register


class ZOOptimizer(ABC):
    """Turns estimates into updates of `params`; hyperparameters are keyword arguments (they
    are written to the log's header so a replay rebuilds the same optimizer)."""

    name = "?"
    flags: dict[str, str] = {}  # hyperparameter -> the run setting it comes from
    # what it holds, for `pocketllm memory`: (what, copies, of what: "float32" / "param" copies
    # of the trainable tensors, in float32 / their own dtype; "largest": float32 copies of the
    # largest trainable tensor, a step's temporaries)
    memory: tuple[tuple[str, int, str], ...] = ()

    def __init__(self, params: Sequence[torch.Tensor], **hyper):
        self.params, self.hyper = list(params), hyper

    def spec(self) -> dict:
        return {"name": self.name, **self.hyper}

    @abstractmethod
    def apply(self, est: Estimate, lr: float, target: Target, logged: dict | None = None) -> dict:
        """Apply one update (the step's explicit `opt.apply(estimate, lr, target)`). `logged`: the step's log record when replaying. Returns the
        fields to add to the step's log record."""


@register("sgd")
class SGD(ZOOptimizer):
    def apply(self, est, lr, target, logged=None):
        target.seeded(list(zip(est.keys, est.coefs(lr))))
        return {}


class Dense(ZOOptimizer):
    """Optimizers that need g_hat itself: w -= lr * direction(g_hat), in float32."""

    # g_hat of one tensor, lr * direction and w - that, each a float32 tensor of its size
    memory = (("ZO step temporaries (one tensor's g_hat, update)", 3, "largest"),)

    @abstractmethod
    def direction(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """The step direction of tensor i (updating the state)."""

    def begin(self) -> None:
        """Called once per step before the tensors' directions."""

    def apply(self, est, lr, target, logged=None):
        self.begin()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                d = self.direction(i, est.dense(i, p))
                p.data.copy_((p.data.float() - lr * d).to(p.dtype))
        return {}


@register("momentum")
class Momentum(Dense):
    flags = {"beta": "zo_beta1"}
    memory = (("ZO momentum", 1, "float32"), *Dense.memory)

    def __init__(self, params, beta: float = 0.9):
        super().__init__(params, beta=beta)
        self.m = [torch.zeros(p.shape, dtype=torch.float32) for p in self.params]

    def direction(self, i, g):
        return self.m[i].mul_(self.hyper["beta"]).add_(g)


@register("adam")
class Adam(Dense):
    flags = {"beta1": "zo_beta1", "beta2": "zo_beta2", "eps": "zo_adam_eps"}
    # direction(): g_hat, m_hat, v_hat, sqrt(v_hat) and + eps alive at once (measured on
    # smollm2-135m --trainable full: 5.7 of its largest tensor beyond the moments)
    memory = (("ZO-Adam moments", 2, "float32"),
              ("ZO-Adam step temporaries (one tensor's g_hat, m_hat, v_hat, ...)", 5, "largest"))

    def __init__(self, params, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        super().__init__(params, beta1=beta1, beta2=beta2, eps=eps)
        self.m = [torch.zeros(p.shape, dtype=torch.float32) for p in self.params]
        self.v = [torch.zeros(p.shape, dtype=torch.float32) for p in self.params]
        self.t = 0

    def begin(self):
        self.t += 1

    def direction(self, i, g):
        b1, b2, eps = self.hyper["beta1"], self.hyper["beta2"], self.hyper["eps"]
        self.m[i].mul_(b1).add_(g, alpha=1 - b1)
        self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = self.m[i] / (1 - b1 ** self.t)
        v_hat = self.v[i] / (1 - b2 ** self.t)
        return m_hat / (v_hat.sqrt() + eps)


@register("sign-sgd")
class SignSGD(Dense):
    def direction(self, i, g):
        return g.sign()


@register("conservative")
class Conservative(ZOOptimizer):
    def apply(self, est, lr, target, logged=None):
        updates = list(zip(est.keys, est.coefs(lr)))
        if logged is not None:  # replay: the decision is in the log
            if logged["kept"]:
                target.seeded(updates)
            return {"kept": logged["kept"]}
        if target.loss is None:
            raise RuntimeError("conservative ZO-SGD needs the step's loss to decide")
        before = target.loss()
        saved = [p.detach().clone() for p in self.params]
        target.seeded(updates)
        after = target.loss()
        kept = after < before
        if not kept:  # restored from the copy: bit for bit the weights before the step
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.data.copy_(s)
        return {"kept": kept, "loss_before": before, "loss_after": after}


def spec_from_args(cfg) -> dict:
    """The optimizer named by --zo-optimizer with its hyperparameters from the run's settings
    (each optimizer's `flags`: hyperparameter -> setting)."""
    cls = REGISTRY.lookup(cfg.zo_optimizer)  # an unknown name fails here, naming the choices
    return {"name": cfg.zo_optimizer, **{h: getattr(cfg, f) for h, f in cls.flags.items()}}


def build(spec: dict, params: Sequence[torch.Tensor]) -> ZOOptimizer:
    """The optimizer a spec (from `spec_from_args` or a log header) describes."""
    spec = dict(spec)
    name = spec.pop("name")
    return REGISTRY.lookup(name)(params, **spec)
