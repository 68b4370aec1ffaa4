"""The training loop, the one every method runs through: set up, then steps, each followed by
the callbacks (report, evaluate, keep the best, checkpoint), resumable at any step.

    method.steps(batch_at, start, iters, hyper)  ->  (step, StepResult) as each step completes

A synchronous method (zeroth- or first-order) makes that a plain `for` over `method.step`; split
mode's is its asynchronous stream (the device runs ahead of the server, acknowledgements arrive
later). Everything after a step is a callback: `callback(step, result, wall)`.

Nothing non-finite is saved: a step whose loss is NaN or inf stops the run, every save first
checks what it writes, and a stopped run goes back to its last save (`Method.rewind`), so that
`--resume` with a smaller learning rate continues from the last finite state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from . import memory, threads
from .config import TrainArgs, check, save_yaml
from .data import Batcher, StepBatches
from .data.source import load_run_data
from .evaluate import EvalResult, evaluate
from .finite import NonFiniteError, first_nonfinite
from .adapter import ADAPTER_WEIGHTS
from .loss import is_masked_lm
from .methods import Method, StepResult, get_method
from .models import load_model
from .report import Reporter
from .schedules import budget_spent, eps_at, lr_at
from .trainable import complete

BEST_DIR = "best"


# --budget-clock: wall seconds, or this process's CPU seconds (all its threads): the latter
# counts what a run spent, not what other jobs on a shared machine took from it
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # keyed by BUDGET_CLOCKS


def train(args: TrainArgs, settings: dict | None = None) -> dict:
    """Run a fine-tune as configured (`settings`: the method's own, see its `Config`);
    returns the summary figures."""
    t_start = time.time()
    check(args)  # every number in its range (the CLI has checked them; a caller in code not)
    method_cls = get_method(args.method)
    cfg = method_cls.resolve(args, settings)  # the method's defaults, before anything is built
    check(cfg)
    method_cls.prepare(args, cfg)             # refuses what it cannot run, before loading
    out = Path(args.adapter_path)
    out.mkdir(parents=True, exist_ok=True)
    memory.tune_allocator()  # (the threads: the CLI's, threads.configure)

    # Data first: a malformed file must fail before minutes of model loading.
    data = load_run_data(args)
    model, tok = load_model(args.model, args.dtype, method_cls.load_scheme(args, cfg))
    enc = data.encode(tok, is_masked_lm(model), args.max_seq_length, args.mask_prompt)
    for w in data.warnings:
        print(f"warning: {w}", flush=True)
    complete(args, enc["train"].items)  # what the trainable set takes from the data
    save_yaml({**dataclasses.asdict(args), **dataclasses.asdict(cfg)}, out / "config.yaml")
    objective = data.objective(tok)  # chosen once, from the data
    spec, params = method_cls.trainable(model, args)
    method = method_cls(model, params, cfg, args, objective)
    run = Run(args, method, model, tok, data, enc, spec, out)
    try:
        return run.loop(t_start)
    finally:
        method.close()


class Run:
    """One training run's state between its steps: what the callbacks share."""

    def __init__(self, args, method: Method, model, tok, data, enc, spec, out: Path):
        self.args, self.method, self.model, self.data, self.enc = args, method, model, data, enc
        self.spec, self.out, self.pad_id = spec, out, tok.pad_token_id
        self.objective = method.objective
        self.choices = getattr(self.objective, "choices", None)  # a records run's label set
        self.clock = 0.0  # training seconds so far (steps only, not evaluation)
        self.saved = 0    # the step of the last save (or of the state resumed): all finite
        self.best: dict | None = None
        # a task is judged on its dev/test set; records on valid
        self.final_split = "test" if data.task else "valid"

    # ---- the loop -------------------------------------------------------------------------
    def loop(self, t_start: float) -> dict:
        args, method = self.args, self.method
        start, before = self.begin()
        batcher = Batcher(self.enc["train"].items, args.batch_size, args.seed, self.pad_id,
                          args.grad_accumulation, self.objective.collate)
        batch_at = StepBatches(batcher)  # a step's micro-batches; .whole(): the training set
        # the thread count is chosen again between steps as other jobs come and go (threads.py)
        callbacks = [self.check_loss, self.record, self.evaluate_every, self.save_every,
                     lambda *_: threads.retune()]
        memory.reset_peak()  # peak from here on: training, not model loading
        clock = CLOCKS[args.budget_clock]
        t0, done = clock(), start
        try:
            for done, res in method.steps(batch_at, start, args.iters, self.hyper):
                dt = clock() - t0  # the step alone: callbacks (evaluation) are not training
                for callback in callbacks:
                    callback(done, res, dt)
                if args.time_budget and self.clock >= 60 * args.time_budget:
                    self.report.say(f"step {done} | time budget of {args.time_budget:g} min "
                                    "spent")
                    break
                t0 = clock()
            method.sync()
            peak = memory.peak_rss_mb()
            self.save(done, final=True)
        except NonFiniteError as e:
            raise self.diverged(e) from None
        with method.evaluating():
            after = self.evaluate(done, "after", self.final_split, synced=True)
            if self.data.task:
                self.evaluate(done, "after", synced=True)
        return self.finish(start, done, before, after, peak, t_start)

    def begin(self) -> tuple[int, EvalResult | None]:
        """Resume or start; the zero-shot evaluation. Returns (first step, that evaluation)."""
        args, method, out = self.args, self.method, self.out
        start = self.saved = method.restore(out) if args.resume else 0
        if args.resume:
            print(f"resumed from {out} at step {start}", flush=True)
        method.open_log(out, fresh=not args.resume)
        self.report = Reporter(out, args.iters, start, fresh=not args.resume)
        self.clock = self.report.last_wall
        self.fwd, self.tokens, self.window = 0, 0, []
        self.best = read_best(out / BEST_DIR) if args.resume and args.keep_best else None
        if self.choices is not None:
            print(f"closed label set of {len(self.choices)} completions: accuracy = the right "
                  f"label ranks first among them", flush=True)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.report.say(f"model {args.model} ({n_params / 1e6:.1f}M params, {args.dtype}) | "
                        f"method {args.method} | {method.describe()} | {self.data.describe()}")
        before = None
        if start == 0 and args.eval_before:
            before = self.evaluate(0, "before", self.final_split)
            if self.data.task:
                self.evaluate(0, "before")
        if (args.keep_best and start and args.steps_per_eval and start % args.steps_per_eval == 0
                and start < args.iters and start not in self.report.valid_steps):
            self.evaluate(start, "eval")  # interrupted between a step and its evaluation:
            #                               --keep-best must see every evaluation
        return start, before

    def finish(self, start, done, before, after, peak: float, t_start: float) -> dict:
        """summary.json and the closing summary."""
        self.report.close()
        summary = {"steps": done - start,
                   "train_seconds": self.clock - self.report.last_wall,  # steps only
                   "wall_seconds": time.time() - t_start, "peak_rss_mb": peak,
                   "forward_passes": self.fwd, "tokens": self.tokens,
                   "output": str(self.out / self.method.output_name(self.spec)),
                   "before": before.__dict__ if before else None,
                   "after": after.__dict__ if after else None,
                   "best": dict(self.best, path=str(self.out / BEST_DIR)) if self.best else None,
                   **self.method.summary()}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary, before, after, self.spec is not None)
        return summary

    def hyper(self, step: int) -> tuple[float, float | None]:
        """The step's learning rate and (zeroth-order) eps, from their schedules (which end
        with the time budget where it stops the run before --iters)."""
        cfg, spent = self.method.cfg, budget_spent(self.args, self.clock)
        return lr_at(self.args, step, spent), (eps_at(cfg, step, self.args.iters, spent)
                                               if hasattr(cfg, "eps") else None)

    def diverged(self, e: NonFiniteError) -> NonFiniteError:
        """The error a run stops with on a non-finite value `e`, once its state on disk is
        back at its last save (nothing after it was written, or it is forgotten now)."""
        self.method.rewind(self.out, self.saved)
        where = (f"--resume continues from step {self.saved}, the last save" if self.saved else
                 "nothing was saved before it (--save-every saves every N steps)")
        return NonFiniteError(e.step, f"{e.what}: training diverged; lower --learning-rate "
                                      f"(now {self.args.learning_rate:g}). Nothing non-finite "
                                      f"was saved: {where}")

    def check_weights(self, step: int) -> None:
        """NonFiniteError if what a save writes holds a NaN or inf (the method synced)."""
        name = first_nonfinite(self.method.saved_tensors())
        if name is not None:
            raise NonFiniteError(step, f"{name} holds non-finite values")

    # ---- callbacks ------------------------------------------------------------------------
    def check_loss(self, done: int, res: StepResult, dt: float) -> None:
        """Stop at the first step whose loss is not finite (before it is logged)."""
        if not math.isfinite(res.loss):
            raise NonFiniteError(done, f"the training loss is {res.loss}")

    def record(self, done: int, res: StepResult, dt: float) -> None:
        """metrics.jsonl, the progress bar, and a report line every --steps-per-report."""
        args = self.args
        self.clock += dt
        self.fwd += res.forward_passes
        self.tokens += res.input_tokens
        self.window.append((res.loss, dt, res.input_tokens))
        self.report.record({"step": done, "wall": self.clock, "loss": res.loss, "lr": res.lr,
                            "step_time": dt, "forward_passes": self.fwd, **res.extra})
        self.report.progress(1, {"loss": f"{res.loss:.3f}"})
        if done % args.steps_per_report == 0 or done == args.iters:
            loss, secs, toks = (sum(col) for col in zip(*self.window))
            parts = [f"step {done}", f"loss {loss / len(self.window):.4f}", f"lr {res.lr:.2e}",
                     f"tok/s {toks / secs:.0f}", f"fwd {self.fwd}",
                     f"peak_rss {memory.peak_rss_mb():.0f}MB", self.method.progress()]
            self.report.say(" | ".join(p for p in parts if p))
            self.window = []

    def evaluate_every(self, done: int, res, dt) -> None:
        args = self.args
        if done >= args.iters:
            return  # the end evaluates after the final save
        if args.steps_per_eval and done % args.steps_per_eval == 0:
            self.evaluate(done, "eval")
        if self.data.task and args.test_every and done % args.test_every == 0:
            self.evaluate(done, "eval", "test")

    def save_every(self, done: int, res, dt) -> None:
        if self.args.save_every and done % self.args.save_every == 0 and done < self.args.iters:
            self.save(done)

    # ---- evaluation, the best adapter, checkpoints ------------------------------------------
    def evaluate(self, step: int, tag: str, split: str = "valid",
                 synced: bool = False) -> EvalResult | None:
        if not self.enc.get(split):
            return None
        if not synced:
            with self.method.evaluating():
                return self.evaluate(step, tag, split, synced=True)
        args = self.args
        r = evaluate(self.model, self.enc[split].items, args.eval_batch_size, self.pad_id,
                     args.val_batches if split == "valid" else -1, objective=self.objective,
                     stats=self.method.scorer(repeated=split == "valid"))
        p = "eval" if split == "valid" else split
        self.report.say(f"step {step} | {tag} | {p}_{r.line().replace(' | ', f' | {p}_')}")
        self.report.record({"step": step, "wall": self.clock,
                            **{f"{p}_{k}": v for k, v in r.metrics().items()}})
        if args.keep_best and split == "valid":
            self.keep_if_best(step, r)
        return r

    def keep_if_best(self, step: int, r: EvalResult) -> None:
        """--keep-best: valid decides (a task's dev/test split stays held out for reporting).
        The record (step, score) rides in the adapter's safetensors header, written atomically
        with the weights, so a kill at any moment cannot leave the two out of step."""
        score = [r.accuracy, -r.loss] if r.accuracy is not None else [-r.loss]
        if not all(map(math.isfinite, score)):
            return  # a NaN loss is no best (and would be saved in the record)
        if self.best is not None and score <= self.best["score"]:
            return
        self.check_weights(step)  # (evaluated, so in sync)
        self.best = {"step": step, "score": score, "valid_loss": r.loss,
                     "valid_accuracy": r.accuracy}
        best_dir = self.out / BEST_DIR
        self.spec.save(self.model, best_dir, base_model=self.args.model,
                       metadata={"pocketllm_best": json.dumps(self.best)})
        self.report.say(f"step {step} | best on valid so far: adapter kept in {best_dir}")

    def save(self, step: int, final: bool = False) -> None:
        """The trained weights (adapter; a full model at the end: the ZO log alone also
        rebuilds it, `pocketllm replay`) and what the method needs to resume."""
        self.method.sync()
        self.check_weights(step)
        if self.spec is not None:
            self.spec.save(self.model, self.out, base_model=self.args.model)
        elif final and self.method.trains_model:
            self.model.save_pretrained(self.out / "model")
        self.method.save_state(self.out, step, final=final)
        self.saved = step


def read_best(best_dir: Path) -> dict | None:
    """The --keep-best record ({step, score, valid_loss, valid_accuracy}) of the adapter kept
    in `best_dir`, or None if there is none."""
    from safetensors import safe_open
    weights = best_dir / ADAPTER_WEIGHTS
    if not weights.exists():
        return None
    with safe_open(str(weights), "pt") as f:
        rec = (f.metadata() or {}).get("pocketllm_best")
    return json.loads(rec) if rec else None


def _print_summary(s: dict, before: EvalResult | None, after: EvalResult | None, lora: bool) -> None:
    print("=" * 72)
    if before and after:
        print(f"held-out loss      {before.loss:.4f} -> {after.loss:.4f}  "
              f"(ppl {before.ppl:.2f} -> {after.ppl:.2f})")
        if before.accuracy is not None:
            print(f"held-out accuracy  {before.accuracy:.1%} -> {after.accuracy:.1%}  "
                  f"({after.records} records; the right label ranks first)")
        if before.macro_f1 is not None:
            print(f"held-out macro-F1  {before.macro_f1:.1%} -> {after.macro_f1:.1%}")
        if before.exact_match is not None:
            print(f"exact completion   {before.exact_match:.1%} -> {after.exact_match:.1%}  "
                  f"(label and end-of-text both the argmax)")
    elif after:
        print(f"held-out loss      {after.loss:.4f}")
    print(f"peak memory (RSS)  {s['peak_rss_mb']:.0f} MB during training")
    print(f"wall time          {s['wall_seconds']:.0f} s ({s['train_seconds']:.0f} s training, "
          f"{s['steps']} steps, {s['forward_passes']} forward passes)")
    print(f"{'adapter' if lora else 'output'} saved to   {s['output']}")
    if s.get("best"):
        b = s["best"]
        what = (f"valid accuracy {b['valid_accuracy']:.1%}" if b["valid_accuracy"] is not None
                else f"valid loss {b['valid_loss']:.4f}")
        print(f"best on valid      step {b['step']} ({what}): {b['path']}")
    print("=" * 72, flush=True)
