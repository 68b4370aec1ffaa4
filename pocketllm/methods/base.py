"""The interface every training method implements, and the registry that names them.

A method owns the trainable tensors and whatever state updating them needs; the loop in
`pocketllm.train` owns data, schedules, evaluation and output, and calls `step` with the
step's learning rate and eps. A method's own settings are a dataclass (`Config`, its fields are
its CLI flags) resolved with the method's defaults before the method is built (`resolve`).
Adding a method is one new file with a `@register("name")` class and one import line in
`methods/__init__.py`; the conformance tests in tests/methods/ then run it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..registry import Registry
from ..trainable import setup_trainable

REGISTRY = Registry("method")
register = REGISTRY.register


def get_method(name: str) -> type["Method"]:
    """The method class registered as `name`."""
    return REGISTRY.lookup(name)


@dataclass
class NoSettings:
    """A method without settings of its own."""


@dataclass
class StepResult:
    loss: float                 # training loss of the step's batch(es)
    tokens: int                 # label tokens processed (each forward counted once)
    forward_passes: int         # forward passes over a micro-batch (a pair forward counts 2)
    extra: dict = field(default_factory=dict)  # method-specific figures for the log
    lr: float = 0.0             # the step's learning rate (set by `Method.steps`)
    input_tokens: int = 0       # tokens the step's forwards read (set by `Method.steps`)


class Method(ABC):
    """Trains `params` of `model` on batches scored by `objective` (its `stats(model, batch,
    groups, head_view)` and `n_scored(batch)`), with settings `cfg` (a `Config`) and the run's
    common settings `run` (seed, trainable, sizes)."""

    name = "?"
    Config: type = NoSettings
    trainable_kinds: tuple[str, ...] = ("full", "lora")
    # Settings used when the run leaves them at 0 / "auto", per trainable set ("lora"), or per
    # trainable set and objective ("lora:task": prompt-based classification, before "lora");
    # each method documents where its figures come from.
    defaults: dict[str, dict] = {}
    defaults_from = ""  # where the defaults were measured (`pocketllm methods` prints it)

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], cfg, run,
                 objective):
        self.model, self.params, self.cfg, self.run = model, params, cfg, run
        self.objective = objective

    trains_model = True  # False: the model stays frozen (split mode trains a side network)
    # the frozen base may be stored quantized (--quantize-base): the method only runs it
    # forward (zeroth-order, split mode), never backpropagates through it
    quantized_base = False
    keeps_best = True  # --keep-best's default: keep the best adapter on valid (not full)

    # ---- configuration ------------------------------------------------------------------
    @classmethod
    def prepare(cls, run, cfg) -> None:
        """Refuse settings this method cannot run with and set the process up, before any data
        or model is loaded (`resolve` has checked the run's trainable set)."""

    @classmethod
    def check(cls, run) -> None:
        """Refuse a run this method cannot train (called first by `resolve`)."""
        if run.keep_best is None:  # the default: keep the best where it is a small copy
            run.keep_best = cls.keeps_best and run.trainable != "full"
        if run.keep_best and run.trainable == "full":
            raise SystemExit("--keep-best keeps a LoRA adapter or another small trainable set "
                             "(--trainable lora, norm, prefix), not --trainable full: a full-"
                             "parameter copy per improvement would double the disk a run takes")
        if run.trainable not in cls.trainable_kinds:
            raise SystemExit(f"--method {cls.name} trains {'/'.join(cls.trainable_kinds)}"
                             f" weights, not --trainable {run.trainable}")
        quant = getattr(run, "quantize_base", "none")
        if quant != "none" and not cls.quantized_base:
            raise SystemExit(f"--quantize-base {quant}: --method {cls.name} backpropagates "
                             "through the base; a quantized base is for the forward-only "
                             "methods (zo-sgd, prge, side)")
        if quant != "none" and cls.trains_model and run.trainable == "full":
            raise SystemExit(f"--quantize-base {quant} freezes the base in low precision: "
                             "--trainable full would train those weights; use --trainable "
                             "lora, norm or prefix")

    @classmethod
    def memory_profile(cls, cfg, run, shape):
        """The kind of peak memory a run of this method makes with settings `cfg` (a
        `memory_estimate.Profile`, what `pocketllm memory` estimates from), on a run of `run`'s
        sizes (trainable, batch_size, max_seq_length, dtype, lora_rank, lora_targets) and a
        model of `shape` (`memory_estimate.Shape`). None: the method has no estimate."""
        return None

    @classmethod
    def load_scheme(cls, run, cfg) -> str:
        """The `--quantize-base` scheme the model is loaded in (`models.load_model`): the
        run's, unless what runs the model quantizes it itself (an engine's programs)."""
        return getattr(run, "quantize_base", "none")

    @classmethod
    def trainable(cls, model: nn.Module, run) -> tuple:
        """(spec or None, [(name, parameter)] this method trains) on `model`
        (`pocketllm.trainable`)."""
        return setup_trainable(model, run)

    @classmethod
    def resolve(cls, run, given: dict | None = None):
        """This method's `Config` from the settings `given` (unknown names refused), with the
        settings left at 0 / "auto" (here or, for the learning rate and its schedule, in `run`)
        replaced by the method's defaults for the trainable set and objective. Mutates `run`'s
        learning_rate / lr_schedule; returns the config."""
        cls.check(run)
        given = dict(given or {})
        names = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise SystemExit(f"--method {cls.name} has no setting "
                             f"{', '.join('--' + u.replace('_', '-') for u in unknown)}")
        cfg = cls.Config(**given)
        objective = "task" if getattr(run, "task", "") else "lm"
        merged = {**cls.defaults.get(run.trainable, {}),
                  **cls.defaults.get(f"{run.trainable}:{objective}", {})}
        for key, value in merged.items():
            where = cfg if key in names else run
            if not getattr(where, key, None) or getattr(where, key) == "auto":
                setattr(where, key, value)
        if getattr(run, "lr_schedule", None) == "auto":
            run.lr_schedule = "constant"
        if not run.learning_rate:
            raise SystemExit(f"--method {cls.name} has no default learning rate for "
                             f"--trainable {run.trainable}: give --learning-rate")
        return cfg

    def describe(self) -> str:
        """The run's report header: what trains, at which rate."""
        n = sum(p.numel() for _, p in self.params)
        return (f"trainable {self.run.trainable} ({n / 1e6:.3f}M) | "
                f"lr {self.run.learning_rate:.2e}")

    def progress(self) -> str:
        """Method-specific figures for a report line ("" for none)."""
        return ""

    # ---- training -----------------------------------------------------------------------
    def steps(self, batch_at, start: int, iters: int, hyper):
        """Run steps start..iters-1; yield (steps done, StepResult) after each. `batch_at(step)`:
        the step's micro-batches; `hyper(step)`: its (lr, eps). Split mode overrides this with
        its asynchronous stream."""
        for step in range(start, iters):
            lr, eps = hyper(step)
            batches = self.batches(batch_at, step)
            res = self.step(batches, step, lr, eps)
            res.lr = lr
            res.input_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            yield step + 1, res

    def batches(self, batch_at, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches step `step` trains on: its own, `batch_at(step)` (a method may
        ask for others: `batch_at.whole()` is the training set once, in order)."""
        return batch_at(step)

    @abstractmethod
    def step(self, batches: list[dict[str, torch.Tensor]], step: int, lr: float,
             eps: float | None = None) -> StepResult:
        """One optimisation step over the micro-batches of `step` (`eps`: the perturbation
        scale for zeroth-order methods; None: the configured one)."""

    def sync(self) -> None:
        """Bring the model's weights up to date (methods may defer work); called before
        evaluation and saving."""

    def scorer(self, repeated: bool = False):
        """What evaluation scores a batch with, `(batch) -> TokenStats`, when not the
        objective's `stats` on the model (an engine's program, or a frozen backbone's cached
        rows for a `repeated` split: `Engine.scorer`); None."""
        return None

    def evaluating(self):
        """A context in which the model scores with what was trained (default: synced)."""
        self.sync()
        return nullcontext()

    # ---- state --------------------------------------------------------------------------
    def open_log(self, out_dir: Path, fresh: bool) -> None:
        """Start (or, resuming, continue) the method's own per-step log in `out_dir`."""

    def save_state(self, out_dir: Path, step: int, final: bool = False) -> None:
        """Persist what is needed to resume after `step` (besides the trained weights)."""

    def restore(self, out_dir: Path) -> int:
        """Restore from `out_dir`; return the number of completed steps."""
        return 0

    def rewind(self, out_dir: Path, step: int) -> None:
        """Forget, in what `restore` reads, the steps after `step` (the last save, whose values
        were finite): called when a run stops on a non-finite value. Nothing to forget for a
        method whose state is written only at saves."""

    def saved_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """[(name, tensor)] a save writes (checked finite before it does): the trained weights,
        and the method's state where it saves some."""
        return list(self.params)

    def output_name(self, spec) -> str:
        """What the run's output is, under its output directory ("": the directory)."""
        return ""

    def summary(self) -> dict:
        """Method-specific figures for the run's summary."""
        return {}

    def close(self) -> None:
        """Release what the method holds open (connections, files)."""


def settings_for(name: str, given: dict) -> dict:
    """Of the method settings `given` (flags / YAML), those of method `name`. A setting of
    another method is refused unless it is left at its default (a saved config.yaml of an
    older version lists every method's)."""
    from ..config import field_defaults
    own = {f.name for f in dataclasses.fields(get_method(name).Config)}
    for key, value in given.items():
        if key in own:
            continue
        owners = [n for n, c in sorted(REGISTRY.items())
                  if key in {f.name for f in dataclasses.fields(c.Config)}]
        defaults = [field_defaults(REGISTRY[n].Config)[key] for n in owners]
        if value not in defaults:
            raise SystemExit(f"--{key.replace('_', '-')} is a setting of --method "
                             f"{'/'.join(owners) or '?'}, not of --method {name}")
    return {k: v for k, v in given.items() if k in own}


def setting_classes() -> list[type]:
    """Every registered method's settings dataclass (their fields are `train`'s flags)."""
    return list(dict.fromkeys(c.Config for _, c in sorted(REGISTRY.items())))


def build(name: str, model: nn.Module, params, run, objective=None, **settings) -> Method:
    """Method `name` on `params` with its settings resolved (defaults filled in), scoring
    batches by `objective` (default: language modelling)."""
    cls = get_method(name)
    if objective is None:
        from ..objectives import LanguageModeling
        objective = LanguageModeling()
    return cls(model, params, cls.resolve(run, settings), run, objective)

