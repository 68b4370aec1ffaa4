"""The zeroth-order method: an estimator's queries, evaluated by an engine, applied by a ZO
optimizer, recorded in the (seed, projected gradients) log.

    keys   = the step's perturbation keys (regenerated from (seed, step, query, tensor));
             what z each key stands for is the run's perturbation (zo/perturbations)
    losses = engine.losses(batch, plan)            # one forward per pass of the plan
    g      = estimator.projected(losses, eps)      # one scalar per query (and any figures
                                                   # it reports: hizoo's curvature)
    opt.apply(Estimate(keys, g), lr, target)       # the update, along the z probed (sgd:
                                                   # deferred into the next step's forward)

An anchored estimator (svrg) also evaluates replicas at its anchor, a copy of the trainable
tensors the engine keeps, and every `anchor_every` steps refreshes it with an estimate over the
whole training set (`estimators/base.py`); each later step's estimate adds the anchor's.

Nothing of z is stored. The step's record goes to `zo_log.jsonl`, a few dozen bytes a step:
the base model plus that log rebuild the trained weights exactly (`pocketllm replay`), and it
is what `--resume` replays after an interruption. `zo-sgd` and `prge` are this class with
different settings (`ZOSGDConfig`, `PRGEConfig`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from .. import engines
from ..config import opt
from ..finite import NonFiniteError
from ..quantize import SCHEMES
from ..schedules import SHAPES
from ..zo import estimators, noise, optim, perturbations
from ..zo import log as zolog
from ..zo.plan import Plan, group_passes
from .base import Method, StepResult


@dataclass
class ZOConfig:
    """Settings every zeroth-order method has."""

    eps: float = opt(0.0, "ZO perturbation scale (0: the method's default)", ge=0)
    perturbation: str = opt("auto", "ZO perturbation distribution; 'auto': the method's default "
                            "(zo-sgd: rademacher for full parameters, the cheaper of the two to "
                            "generate over every weight; gaussian for LoRA)",
                            choices=lambda: ("auto", *noise.DISTS))
    eps_schedule: str = opt("constant", "ZO eps schedule (to --eps-final)",
                            choices=lambda: tuple(SHAPES))
    eps_final: float = opt(0.0, "final eps of a linear/cosine eps schedule (0: eps/10)", ge=0)
    estimator: str = opt("spsa", "ZO gradient estimator (pocketllm/zo/estimators)",
                         choices=lambda: tuple(estimators.REGISTRY))
    engine: str = opt("torch", "what runs the ZO forward passes (pocketllm/engines)",
                      choices=lambda: tuple(engines.REGISTRY))
    program_cache: str = opt("", "--engine executorch|onnxruntime: where exported programs "
                             "are cached (default $POCKETLLM_CACHE/programs, else "
                             "~/.cache/pocketllm/programs)")
    max_replicas: int = opt(0, "ZO: at most R batch replicas per forward (0: no cap); less "
                            "activation memory for more forwards", ge=0)
    zo_optimizer: str = opt("sgd", "ZO update rule (zo-sgd, prge); momentum/adam keep state "
                            "the size of the trainable tensors",
                            choices=lambda: tuple(optim.REGISTRY))
    zo_beta1: float = opt(0.9, "ZO momentum / Adam beta1", ge=0, lt=1)
    zo_beta2: float = opt(0.999, "ZO Adam beta2", ge=0, lt=1)
    # > 0: Adam divides by sqrt(v) + eps, and v is 0 wherever no estimate has reached yet
    zo_adam_eps: float = opt(1e-8, "ZO Adam epsilon", gt=0)
    anchor_every: int = opt(5, "--estimator svrg: steps between anchor refreshes, each a "
                            "full-batch estimate over the whole training set at the current "
                            "weights, kept as the anchor (a copy of the trainable tensors: the "
                            "adapter's size for LoRA; refused for --trainable full)", ge=1)
    anchor_lr: float = opt(1.0, "--estimator svrg: a refresh step's learning rate as a "
                           "multiple of the step's (MeZO-SVRG's lr_1 / lr_2)", gt=0)
    zo_perturbation: str = opt("dense", "which coordinates a ZO step perturbs, and along what "
                               "(pocketllm/zo/perturbations; the noise distribution is "
                               "--perturbation): dense (all, the fused kernel), sparse "
                               "(Sparse-MeZO: each tensor's small-magnitude coordinates, "
                               "--sparsity), lowrank (LOZO: z = U V^T per matrix, "
                               "--lowrank-rank, --lowrank-refresh), hizoo (HiZOO: z scaled by "
                               "a running diagonal curvature estimate, --hessian-smooth; with "
                               "--estimator hizoo)",
                               choices=lambda: tuple(perturbations.REGISTRY))
    sparsity: float = opt(0.75, "--zo-perturbation sparse: the fraction of each tensor's "
                          "coordinates left unperturbed (its largest in magnitude when "
                          "training starts)", ge=0, lt=1)
    lowrank_rank: int = opt(2, "--zo-perturbation lowrank: the rank r of each matrix's z", ge=1)
    lowrank_refresh: int = opt(50, "--zo-perturbation lowrank: steps a subspace (V) is kept "
                               "before it is drawn again", ge=1)
    hessian_smooth: float = opt(1e-6, "--zo-perturbation hizoo: the weight of a step's "
                                "curvature in the running diagonal estimate (HiZOO's code "
                                "uses 1e-6..1e-8 on OPT-13B; not tuned here)", ge=0, lt=1)

    def queries_and_parallel(self, method: "ZOMethod") -> tuple[int, str]:
        """How many queries a step makes and how their replicas share forwards."""
        raise NotImplementedError


class ZOMethod(Method):
    """Zeroth-order training: no autograd anywhere, so about the memory of inference."""

    Config = ZOConfig
    quantized_base = True  # forwards only

    @classmethod
    def prepare(cls, run, cfg) -> None:
        # an estimator / query count / grouping / perturbation that cannot work, alone or
        # together, fails before the model loads
        try:
            est = estimators.build(cfg, getattr(cfg, "queries", 1))
            group_passes(est.replicas(), getattr(cfg, "parallel", "both"), cfg.max_replicas)
            spec = perturbations.spec_from_args(cfg)
            pert = perturbations.REGISTRY[spec.pop("name")]
            pert.check(**spec)
            missing = [f for f in pert.needs if f not in est.reports]
            if missing:
                with_it = [n for n, e in sorted(estimators.REGISTRY.items())
                           if set(pert.needs) <= set(e.reports)]
                raise ValueError(f"--zo-perturbation {pert.name} needs the "
                                 f"{', '.join(missing)} an estimator reports: --estimator "
                                 f"{' or '.join(with_it)} (not {cfg.estimator})")
            if est.anchor_every and not pert.key_only:
                # svrg probes a step's z at its anchor as well as at w, and applies the
                # anchor's z steps after it was probed: only a z of the key alone is the same
                fit = [n for n, p in sorted(perturbations.REGISTRY.items()) if p.key_only]
                raise ValueError(f"--estimator {cfg.estimator} needs the same z at its anchor "
                                 f"and at the current weights, and --zo-perturbation "
                                 f"{pert.name} draws z from the weights (or from state they "
                                 f"move): use --zo-perturbation {' or '.join(fit)}")
            scheme = cls.load_scheme(run, cfg)  # a --quantize-base the engine cannot build
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if SCHEMES[scheme].rounds_activations:  # (the torch model, quantized as it loads)
            print(f"warning: --quantize-base {scheme} rounds the activations of every layer, "
                  "those a perturbation reaches too: the zeroth-order differences are then "
                  "mostly rounding (benchmarks/results/fd_agreement_L4.md: 57x the float "
                  "base's, uncorrelated with them). Use int8 or int4 here, or --engine "
                  "onnxruntime, whose programs round them below the adapter only",
                  file=sys.stderr, flush=True)
        if est.anchor_every and run.trainable == "full":
            raise SystemExit(f"error: --estimator {cfg.estimator} keeps a copy of the trainable "
                             "tensors at its anchor: with --trainable full that is a second copy "
                             "of the model. Use --trainable lora, norm or prefix")

    @classmethod
    def load_scheme(cls, run, cfg) -> str:
        return engines.REGISTRY.lookup(cfg.engine).load_scheme(
            getattr(run, "quantize_base", "none"))

    def __init__(self, model, params, cfg, run, objective):
        super().__init__(model, params, cfg, run, objective)
        for _, p in params:
            p.requires_grad_(False)  # no autograd anywhere: inference memory
        # built on the weights before any step (a sparse mask's thresholds come from them, as
        # they do when the log is replayed on the base model)
        self.perturbation = perturbations.build(perturbations.spec_from_args(cfg),
                                                [p for _, p in params], cfg.perturbation)
        engine = engines.REGISTRY.lookup(cfg.engine)
        quant = getattr(run, "quantize_base", "none")
        # (an engine that quantizes its own programs is told the scheme: the model is float)
        own = {"quantize": quant} if engine.schemes is not None and quant != "none" else {}
        try:  # an engine refuses what it cannot run (a model, trainable set, objective)
            self.engine = engine(model, params, objective.stats, dist=cfg.perturbation,
                                 perturbation=self.perturbation, **own,
                                 **{k: getattr(cfg, k) for k in engine.settings})
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        # an engine whose programs hold the frozen weights drops the torch model's copy (and
        # evaluates through its own program, `scorer`): the weights are held once
        self.engine.release_model()
        self.queries, parallel = cfg.queries_and_parallel(self)
        self.estimator = estimators.build(cfg, self.queries)
        self.replicas = self.estimator.replicas()
        self.passes = group_passes(self.replicas, parallel, cfg.max_replicas)
        if self.estimator.anchor_every:
            self.refresh_replicas = self.estimator.refresh_replicas()
            self.refresh_passes = group_passes(self.refresh_replicas, parallel,
                                               cfg.max_replicas)
        # the anchor's (refresh step, projected grads), set by each refresh
        self.anchor: tuple[int, list[float]] | None = None
        self.opt = optim.build(optim.spec_from_args(cfg), [p for _, p in params])
        self.key_space = zolog.KeySpace(run.seed)  # federated runs set run/round/client
        self.log: zolog.ZOLog | None = None

    def describe(self) -> str:
        spec = self.perturbation.spec()
        name = spec.pop("name")
        pert = "" if name == "dense" else (
            f" | {name} z ({', '.join(f'{k} {v}' for k, v in spec.items())})")
        return f"{super().describe()} | eps {self.cfg.eps:.0e}{pert}"

    def keys(self, step: int) -> list[list[perturbations.Key]]:
        return self.perturbation.keys(self.key_space, step, self.queries, len(self.params))

    def batches(self, batch_at, step):
        # an anchored estimator's refresh estimates over the whole training set
        return batch_at.whole() if self.estimator.refreshes(step) else batch_at(step)

    def step(self, batches, step, lr, eps=None):
        eps = self.cfg.eps if eps is None else eps
        rec: dict = {"step": step}
        if self.estimator.refreshes(step):  # the current weights become the anchor
            self.engine.keep_anchor()
            replicas, passes = self.refresh_replicas, self.refresh_passes
            projected = self.estimator.refresh_projected
            lr *= self.estimator.anchor_lr
            rec["refresh"] = True
        else:
            replicas, passes, projected = self.replicas, self.passes, self.estimator.projected
        plan = Plan(self.keys(step), eps, replicas, passes)
        figures, loss, tokens = self._evaluate(batches, plan, projected, step)
        g = figures["projected_grads"]
        if rec.get("refresh"):
            self.anchor = (step, g)
        elif self.anchor is not None:  # each step adds the anchor's estimate (svrg)
            rec.update(anchor=self.anchor[0], anchor_grads=self.anchor[1])
        rec.update(**figures, lr=lr, eps=eps, loss=loss)
        self._extra_fwd = 0
        target = optim.Target([p for _, p in self.params], self.engine.apply,
                              lambda: self._plain_loss(batches))
        est = zolog.estimate_of(rec, self.key_space, len(self.params), self.perturbation)
        extra = self.opt.apply(est, lr, target)
        rec.update(extra)
        if self.perturbation.needs:
            # its state moves after this step's update, which must be drawn with the state
            # the step was probed with: apply it now rather than in the next forward
            self.engine.sync()
            self.perturbation.observe(plan.keys, rec)
        self._log(rec)
        return StepResult(loss=loss, tokens=tokens,
                          forward_passes=len(replicas) * len(batches) + self._extra_fwd,
                          extra={"projected_grad": sum(g) / len(g), **extra})

    def probe(self, batches, keys, eps: float) -> tuple[list[float], float, int]:
        """A step's estimate without its update: the projected gradients along `keys` (per
        query, its keys per tensor) on `batches` at the current weights, the loss there and
        the tokens scored. A federated device sends these to the server, which aggregates
        every device's before any of them moves (`pocketllm.federated`)."""
        plan = Plan(keys, eps, self.replicas, self.passes)
        figures, loss, tokens = self._evaluate(batches, plan, self.estimator.projected, 0)
        return figures["projected_grads"], loss, tokens

    def probe_losses(self, batches, keys, eps: float) -> tuple[list[float], float, int]:
        """The replicas' losses along `keys` on `batches` (each the token-weighted mean over
        all their rows), the loss at the current weights and the tokens scored: what the
        estimator's `projected` turns into a step. A federated device sends these when the
        server pools every device's losses before applying the estimator once (`--aggregate
        pooled`): with all devices, the step of pooled training on their union."""
        plan = Plan(keys, eps, self.replicas, self.passes)
        here = torch.tensor([not r.anchor for r in plan.replicas])
        total, tokens = torch.zeros(len(plan.replicas), dtype=torch.float64), 0
        for b, L in self._losses(batches, plan, 0):
            n = self.objective.n_scored(b)
            total += n * L
            tokens += n
        L = total / max(tokens, 1)
        return L.tolist(), L[here].mean().item(), tokens

    def _losses(self, batches, plan, step):
        """Each micro-batch with its replicas' losses under `plan`; a non-finite loss stops
        the run (as step `step` + 1) before anything is applied or logged."""
        for b in batches:
            L = self.engine.losses(b, plan)
            if not torch.isfinite(L).all():
                raise NonFiniteError(step + 1, f"the loss at the perturbed weights is "
                                     f"{L.tolist()}")
            yield b, L

    def _evaluate(self, batches, plan, projected, step) -> tuple[dict, float, int]:
        """The step's per-query figures (its projected grads and what the estimator
        `reports`), each averaged over the micro-batches, which share the step's
        perturbations; the loss at the current weights; the tokens scored. A non-finite loss
        or figure stops the run before anything is applied or logged."""
        here = torch.tensor([not r.anchor for r in plan.replicas])  # the loss reported: at w
        figures, losses, rows, tokens = [], [], [], 0
        for b, L in self._losses(batches, plan, step):
            got = {"projected_grads": projected(L, plan.eps),
                   **self.estimator.report(L, plan.eps)}
            if not all(math.isfinite(x) for v in got.values() for x in v):  # eps too small
                raise NonFiniteError(step + 1, f"the estimate is {got} "
                                     f"(--eps {plan.eps:g} too small?)")
            figures.append(got)
            losses.append([L[here].mean().item()])
            rows.append(b["input_ids"].shape[0])
            tokens += self.objective.n_scored(b)
        mean = {k: _mean([f[k] for f in figures], rows) for k in figures[0]}
        return mean, _mean(losses, rows)[0], tokens

    def _plain_loss(self, batches) -> float:
        """The loss at the current weights (pending updates applied), for `conservative`."""
        ls = [self.engine.loss(b) for b in batches]
        self._extra_fwd += len(batches)
        return sum(ls) / len(ls)

    def sync(self):
        self.engine.sync()

    def scorer(self, repeated: bool = False):
        return self.engine.scorer(repeated)

    # the step log (zo/log.py): reproducibility and resume
    def header(self) -> dict:
        return zolog.header(self.key_space, dist=self.cfg.perturbation,
                            trainable=self.run.trainable, dtype=self.run.dtype,
                            params=[n for n, _ in self.params], queries=self.queries,
                            optimizer=self.opt.spec(), estimator=self.estimator.name,
                            estimator_settings=self.estimator.settings(),
                            perturbation=self.perturbation.spec())

    def open_log(self, out_dir, fresh):
        self.log = zolog.ZOLog(out_dir)
        self.log.start(self.header(), fresh)

    def _log(self, rec: dict) -> None:
        if self.log is not None:
            self.log.append(rec)

    def restore(self, out_dir) -> int:
        def anchor(rec):  # the weights before a refresh step are the anchor it kept
            self.engine.keep_anchor()
            self.anchor = (rec["step"], rec["projected_grads"])
        return zolog.ZOLog(out_dir).restore(self.header(), self.params, self.opt,
                                            self.perturbation, anchor)

    def rewind(self, out_dir, step) -> None:
        # the log runs ahead of the saves: its steps after the last save may be the ones that
        # overflowed, and `--resume` replays every step it holds
        (self.log or zolog.ZOLog(out_dir)).truncate(step)

    # the memory profile (pocketllm memory): each ZO method's `memory_profile` reads these
    @classmethod
    def kept_state(cls, cfg) -> tuple[tuple[str, int, str], ...]:
        """What the estimator, the perturbation and the ZO optimizer keep from step to step,
        each as (what, copies of the trainable tensors, dtype): their declared `memory`."""
        return (*estimators.REGISTRY[cfg.estimator].memory,
                *perturbations.REGISTRY[cfg.zo_perturbation].memory,
                *optim.REGISTRY[cfg.zo_optimizer].memory)

    @classmethod
    def widest_pass(cls, cfg, queries: int, parallel: str) -> tuple[int, int]:
        """(forwards a step makes, replicas of the batch in the widest of them) for `queries`
        queries grouped by `parallel` and --max-replicas, as `__init__` groups them: the widest
        forward holds the step's largest activations."""
        est = estimators.build(cfg, queries)
        passes = group_passes(est.replicas(), parallel, cfg.max_replicas)
        widest = max(len(p) for p in passes)
        if est.anchor_every:  # a refresh's forwards, over the whole training set
            widest = max(widest, *map(len, group_passes(est.refresh_replicas(), parallel,
                                                        cfg.max_replicas)))
        return len(passes), widest


def _mean(per_batch: list[list[float]], rows: list[int]) -> list[float]:
    """Per entry, the mean over micro-batches weighted by their rows (the whole training set's
    last micro-batch may be smaller); equal micro-batches: the plain mean."""
    if len(set(rows)) == 1:
        return [sum(v) / len(v) for v in zip(*per_batch)]
    total = sum(rows)
    return [sum(r * x for r, x in zip(rows, v)) / total for v in zip(*per_batch)]
