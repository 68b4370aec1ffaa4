"""The training loop: set up, then step / report / evaluate / save, resumable at any step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import memory
from .config import TrainArgs, save_yaml
from .data import Batcher
from .data.source import load_run_data
from .lora import (ADAPTER_WEIGHTS, LoraSpec, apply_lora, default_targets, lora_parameters,
                   save_adapter)
from .evaluate import EvalResult, evaluate
from .loss import is_masked_lm
from .methods import get_method
from .schedules import lr_at
from .models import load_model
from .report import Reporter


def setup_trainable(model, args: TrainArgs):
    """Inject LoRA if asked; return (spec or None, [(name, parameter)] to train)."""
    if args.trainable == "lora":
        # seeded: a resumed run must rebuild the same initial adapter
        torch.manual_seed(args.seed)
        spec = LoraSpec(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        targets=list(args.lora_targets) or default_targets(model))
        apply_lora(model, spec)
        return spec, lora_parameters(model, fa=args.lora_fa)
    for p in model.parameters():
        p.requires_grad_(False)
    return None, list(model.named_parameters())


def train(args: TrainArgs) -> dict:
    """Run a fine-tune as configured; returns the summary figures."""
    t_start = time.time()
    out = Path(args.adapter_path)
    out.mkdir(parents=True, exist_ok=True)
    memory.tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    method_cls = get_method(args.method)
    if hasattr(method_cls, "run"):  # a method with a loop of its own (split mode)
        if args.keep_best:
            raise SystemExit(f"--keep-best is not available with --method {args.method}: "
                             "its side network is trained and kept on the server")
        return method_cls.run(args)
    if args.keep_best and args.trainable != "lora":
        raise SystemExit("--keep-best keeps a LoRA adapter (--trainable lora); a full-parameter "
                         "copy per improvement would double the disk a run takes")
    if args.trainable not in method_cls.trainable_kinds:
        raise SystemExit(f"--method {args.method} trains {'/'.join(method_cls.trainable_kinds)}"
                         f" weights, not --trainable {args.trainable}")

    # Data first: a malformed file must fail before minutes of model loading.
    data = load_run_data(args)
    model, tok = load_model(args.model, args.dtype)
    enc = data.encode(tok, is_masked_lm(model), args.max_seq_length, args.mask_prompt)
    for w in data.warnings:
        print(f"warning: {w}", flush=True)
    pad_id = tok.pad_token_id
    spec, params = setup_trainable(model, args)
    method = method_cls(model, params, args)  # fills in the method's default lr / eps
    save_yaml(args, out / "config.yaml")

    start = method.restore(out) if args.resume else 0
    if args.resume:
        print(f"resumed from {out} at step {start}", flush=True)
    method.open_log(out, fresh=not args.resume)
    report = Reporter(out, args.iters, start, fresh=not args.resume)
    batcher = Batcher(enc["train"].items, args.batch_size, args.seed, pad_id,
                      args.grad_accumulation)
    choices = data.label_choices(tok)
    if choices is not None:
        print(f"closed label set of {len(choices)} completions: accuracy = the right label "
              f"ranks first among them", flush=True)
    # training seconds so far (steps only, not evaluation): the x axis of accuracy-vs-time
    clock = [report.last_wall]

    def run_eval(step: int, tag: str, split: str = "valid") -> EvalResult | None:
        if not enc.get(split):
            return None
        method.sync()
        r = evaluate(model, enc[split].items, args.eval_batch_size, pad_id,
                     args.val_batches if split == "valid" else -1, choices)
        p = "eval" if split == "valid" else split
        report.say(f"step {step} | {tag} | {p}_{r.line().replace(' | ', f' | {p}_')}")
        report.record({"step": step, "wall": clock[0],
                       **{f"{p}_{k}": v for k, v in r.metrics().items()}})
        if args.keep_best and split == "valid":
            keep_if_best(step, r)
        return r

    # --keep-best: valid decides (a task's dev/test split stays held out for reporting). The
    # record (step, score) rides in the adapter's safetensors header, written atomically with
    # the weights, so a kill at any moment cannot leave the two out of step.
    best_dir = out / BEST_DIR
    best = read_best(best_dir) if args.resume else None

    def keep_if_best(step: int, r: EvalResult) -> None:
        nonlocal best
        score = [r.accuracy, -r.loss] if r.accuracy is not None else [-r.loss]
        if best is not None and score <= best["score"]:
            return
        best = {"step": step, "score": score, "valid_loss": r.loss, "valid_accuracy": r.accuracy}
        save_adapter(model, best_dir, spec, base_model=args.model,
                     metadata={"pocketllm_best": json.dumps(best)})
        report.say(f"step {step} | best on valid so far: adapter kept in {best_dir}")

    n_train = sum(p.numel() for _, p in params)
    report.say(f"model {args.model} ({sum(p.numel() for p in model.parameters())/1e6:.1f}M params, "
               f"{args.dtype}) | method {args.method} | trainable {args.trainable} "
               f"({n_train/1e6:.3f}M) | lr {args.learning_rate:.2e} | eps {args.eps:.0e} | "
               f"{data.describe()}")
    # a task is judged on its dev/test set; records on valid
    final_split = "test" if data.task else "valid"
    before = None
    if start == 0 and args.eval_before:
        before = run_eval(0, "before", final_split)
        if data.task:
            run_eval(0, "before")
    if (args.keep_best and start and args.steps_per_eval and start % args.steps_per_eval == 0
            and start < args.iters and start not in report.valid_steps):
        run_eval(start, "eval")  # interrupted between a step and its evaluation: --keep-best
        #                          must see every evaluation an uninterrupted run sees
    memory.reset_peak()  # peak from here on: training, not model loading
    t_train, tokens_seen, fwd, window = time.time(), 0, 0, []
    for step in range(start, args.iters):
        t0 = time.time()
        batches = [batcher(step, k) for k in range(args.grad_accumulation)]
        lr = lr_at(args, step)
        res = method.step(batches, step, lr)
        dt = time.time() - t0
        n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
        tokens_seen += n_tok
        fwd += res.forward_passes
        window.append((res.loss, dt, n_tok))
        done = step + 1
        clock[0] += dt
        rec = {"step": done, "wall": clock[0], "loss": res.loss, "lr": lr, "step_time": dt,
               "forward_passes": fwd, **res.extra}
        report.record(rec)
        report.progress(1, {"loss": f"{res.loss:.3f}"})
        if done % args.steps_per_report == 0 or done == args.iters:
            loss = sum(w[0] for w in window) / len(window)
            tps = sum(w[2] for w in window) / sum(w[1] for w in window)
            report.say(f"step {done} | loss {loss:.4f} | lr {lr:.2e} | "
                       f"tok/s {tps:.0f} | fwd {fwd} | peak_rss {memory.peak_rss_mb():.0f}MB")
            window = []
        if args.steps_per_eval and done % args.steps_per_eval == 0 and done < args.iters:
            run_eval(done, "eval")
        if data.task and args.test_every and done % args.test_every == 0 and done < args.iters:
            run_eval(done, "eval", "test")
        if args.save_every and done % args.save_every == 0 and done < args.iters:
            save(method, model, spec, args, out, done)
    method.sync()
    train_time = time.time() - t_train
    peak = memory.peak_rss_mb()
    save(method, model, spec, args, out, args.iters)
    after = run_eval(args.iters, "after", final_split)
    if data.task:
        run_eval(args.iters, "after")
    report.close()
    summary = {"steps": args.iters - start, "train_seconds": train_time,
               "wall_seconds": time.time() - t_start, "peak_rss_mb": peak,
               "forward_passes": fwd, "tokens": tokens_seen, "output": str(out),
               "before": before.__dict__ if before else None,
               "after": after.__dict__ if after else None,
               "best": dict(best, path=str(best_dir)) if best else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, before, after, spec is not None)
    return summary


BEST_DIR = "best"


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


def save(method, model, spec, args: TrainArgs, out: Path, step: int) -> None:
    method.sync()
    if spec is not None:
        save_adapter(model, out, spec, base_model=args.model)
    elif step == args.iters:
        # full-parameter: the trained weights as a standard HF directory (the ZO log alone
        # also rebuilds them: `pocketllm replay`)
        model.save_pretrained(out / "model")
    method.save_state(out, step)


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
