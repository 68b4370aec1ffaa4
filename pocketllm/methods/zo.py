"""The zeroth-order method: an estimator's queries, evaluated by an engine, applied by a ZO
optimizer, recorded in the (seed, projected gradients) log.

    keys   = the step's perturbation keys (regenerated from (seed, step, query, tensor));
             what z each key stands for is the run's perturbation (zo/perturbations)
    losses = engine.losses(batch, plan)            # one forward per pass of the plan
    g      = estimator.projected(losses, eps)      # one scalar per query
    opt.apply(Estimate(keys, g), lr, target)       # the update (sgd: deferred by the engine
                                                   # into the next step's perturbation kernel)

Nothing of z is stored. The step's record goes to `zo_log.jsonl`, a few dozen bytes a step:
the base model plus that log rebuild the trained weights exactly (`pocketllm replay`), and it
is what `--resume` replays after an interruption. `zo-sgd` and `prge` are this class with
different settings (`ZOSGDConfig`, `PRGEConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import engines
from ..config import opt
from ..schedules import SHAPES
from ..zo import estimators, noise, optim, perturbations
from ..zo import log as zolog
from ..zo.plan import Plan, group_passes
from .base import Method, StepResult


@dataclass
class ZOConfig:
    """Settings every zeroth-order method has."""

    eps: float = opt(0.0, "ZO perturbation scale (0: the method's default)")
    perturbation: str = opt("auto", "ZO perturbation distribution; 'auto': the method's default "
                            "(zo-sgd: rademacher for full parameters, the cheaper of the two to "
                            "generate over every weight; gaussian for LoRA)",
                            choices=lambda: ("auto", *noise.DISTS))
    eps_schedule: str = opt("constant", "ZO eps schedule (to --eps-final)",
                            choices=lambda: tuple(SHAPES))
    eps_final: float = opt(0.0, "final eps of a linear/cosine eps schedule (0: eps/10)")
    estimator: str = opt("spsa", "ZO gradient estimator (pocketllm/zo/estimators)",
                         choices=lambda: tuple(estimators.REGISTRY))
    engine: str = opt("torch", "what runs the ZO forward passes (pocketllm/engines)",
                      choices=lambda: tuple(engines.REGISTRY))
    max_replicas: int = opt(0, "ZO: at most R batch replicas per forward (0: no cap); less "
                            "activation memory for more forwards")
    zo_optimizer: str = opt("sgd", "ZO update rule (zo-sgd, prge); momentum/adam keep state "
                            "the size of the trainable tensors",
                            choices=lambda: tuple(optim.REGISTRY))
    zo_beta1: float = opt(0.9, "ZO momentum / Adam beta1")
    zo_beta2: float = opt(0.999, "ZO Adam beta2")
    zo_adam_eps: float = opt(1e-8, "ZO Adam epsilon")
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
                          "training starts)")
    lowrank_rank: int = opt(2, "--zo-perturbation lowrank: the rank r of each matrix's z")
    lowrank_refresh: int = opt(50, "--zo-perturbation lowrank: steps a subspace (V) is kept "
                               "before it is drawn again")
    hessian_smooth: float = opt(1e-6, "--zo-perturbation hizoo: the weight of a step's "
                                "curvature in the running diagonal estimate (HiZOO's code "
                                "uses 1e-6..1e-8 on OPT-13B; not tuned here)")

    def queries_and_parallel(self, method: "ZOMethod") -> tuple[int, str]:
        """How many queries a step makes and how their replicas share forwards."""
        raise NotImplementedError


class ZOMethod(Method):
    """Zeroth-order training: no autograd anywhere, so about the memory of inference."""

    Config = ZOConfig

    @classmethod
    def prepare(cls, run, cfg) -> None:
        # an estimator / query count / grouping that cannot work fails before the model loads
        try:
            est = estimators.REGISTRY.lookup(cfg.estimator)(getattr(cfg, "queries", 1))
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
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    def __init__(self, model, params, cfg, run, objective):
        super().__init__(model, params, cfg, run, objective)
        for _, p in params:
            p.requires_grad_(False)  # no autograd anywhere: inference memory
        # built on the weights before any step (a sparse mask's thresholds come from them, as
        # they do when the log is replayed on the base model)
        self.perturbation = perturbations.build(perturbations.spec_from_args(cfg),
                                                [p for _, p in params], cfg.perturbation)
        self.engine = engines.REGISTRY.lookup(cfg.engine)(model, params, objective.stats,
                                                          dist=cfg.perturbation,
                                                          perturbation=self.perturbation)
        self.queries, parallel = cfg.queries_and_parallel(self)
        self.estimator = estimators.REGISTRY.lookup(cfg.estimator)(self.queries)
        self.replicas = self.estimator.replicas()
        self.passes = group_passes(self.replicas, parallel, cfg.max_replicas)
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

    def step(self, batches, step, lr, eps=None):
        eps = self.cfg.eps if eps is None else eps
        plan = Plan(self.keys(step), eps, self.replicas, self.passes)
        grads, reports, losses, tokens = [], [], [], 0
        for b in batches:  # grad accumulation: the same perturbations for every micro-batch
            L = self.engine.losses(b, plan)
            grads.append(self.estimator.projected(L, eps))
            reports.append(self.estimator.report(L, eps))
            losses.append(L.mean().item())
            tokens += self.objective.n_scored(b)
        g = [sum(gj) / len(gj) for gj in zip(*grads)]
        # the estimator's other per-query figures (hizoo: curvature), averaged like g
        reported = {k: [sum(v) / len(v) for v in zip(*(r[k] for r in reports))]
                    for k in reports[0]}
        self._extra_fwd = 0
        target = optim.Target([p for _, p in self.params], self.engine.apply,
                              lambda: self._plain_loss(batches))
        extra = self.opt.apply(optim.Estimate(plan.keys, g, self.cfg.perturbation,
                                              self.perturbation), lr, target)
        loss = sum(losses) / len(losses)
        rec = {"step": step, "projected_grads": g, **reported, "lr": lr, "eps": eps,
               "loss": loss, **extra}
        if self.perturbation.needs:
            # its state moves after this step's update, which must be drawn with the state
            # the step was probed with: apply it now rather than in the next forward
            self.engine.sync()
            self.perturbation.observe(plan.keys, rec)
        self._log(rec)
        return StepResult(loss=loss, tokens=tokens,
                          forward_passes=len(self.replicas) * len(batches) + self._extra_fwd,
                          extra={"projected_grad": sum(g) / len(g), **extra})

    def _plain_loss(self, batches) -> float:
        """The loss at the current weights (pending updates applied), for `conservative`."""
        ls = [self.engine.loss(b) for b in batches]
        self._extra_fwd += len(batches)
        return sum(ls) / len(ls)

    def sync(self):
        self.engine.sync()

    # the step log (zo/log.py): reproducibility and resume
    def header(self) -> dict:
        return zolog.header(self.key_space, dist=self.cfg.perturbation,
                            trainable=self.run.trainable, dtype=self.run.dtype,
                            params=[n for n, _ in self.params], queries=self.queries,
                            optimizer=self.opt.spec(), estimator=self.estimator.name,
                            perturbation=self.perturbation.spec())

    def open_log(self, out_dir, fresh):
        self.log = zolog.ZOLog(out_dir)
        self.log.start(self.header(), fresh)

    def _log(self, rec: dict) -> None:
        if self.log is not None:
            self.log.append(rec)

    def restore(self, out_dir) -> int:
        return zolog.ZOLog(out_dir).restore(self.header(), self.params, self.opt,
                                            self.perturbation)

    # the memory profile (pocketllm memory): each ZO method's `memory_profile` reads this
    @classmethod
    def widest_pass(cls, cfg, queries: int, parallel: str) -> tuple[int, int]:
        """(forwards a step makes, replicas of the batch in the widest of them) for `queries`
        queries grouped by `parallel` and --max-replicas, as `__init__` groups them: the widest
        forward holds the step's largest activations."""
        replicas = estimators.REGISTRY.lookup(cfg.estimator)(queries).replicas()
        passes = group_passes(replicas, parallel, cfg.max_replicas)
        return len(passes), max(len(p) for p in passes)
