"""`pocketllm bench accuracy`: the few-shot protocol as one command.

Every run (a label and the `pocketllm train` flags it adds) trains once per seed on the task's
k-per-class sample with the same wall-clock budget on one thread (`--time-budget`, steps only),
keeping its best adapter on the valid split (`--keep-best`); that adapter alone is then scored
once on the dev/test split. `zero-shot` scores the base model. Each (run, seed) is a process of
its own (`--jobs` at a time, each pinned to its own core where there are enough), and a
finished one is skipped when the command is run again: it resumes where it stopped.

Writes OUT/accuracy.md (mean and std over seeds, per-seed figures, the command), accuracy.csv
(one row per run and seed) and accuracy.png (valid accuracy against training minutes).
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ZERO_SHOT = "zero-shot"
RESULT = "result.json"


@dataclass
class Job:
    label: str
    seed: int
    flags: list[str]   # `pocketllm train` flags of the run ([] for zero-shot)
    out: Path

    @property
    def trains(self) -> bool:
        return self.label != ZERO_SHOT


def parse_runs(specs: list[str]) -> dict[str, list[str]]:
    """LABEL or LABEL=FLAGS entries: a bare method name is `--method NAME`; `zero-shot` trains
    nothing."""
    runs: dict[str, list[str]] = {}
    for spec in specs:
        label, sep, flags = spec.partition("=")
        label = label.strip()
        if not label or "/" in label:
            raise SystemExit(f"--runs {spec!r}: expected LABEL or LABEL=FLAGS (a plain name)")
        if label in runs:
            raise SystemExit(f"--runs: {label!r} given twice")
        if label == ZERO_SHOT and sep:
            raise SystemExit(f"--runs {spec!r}: zero-shot trains nothing, it takes no flags")
        runs[label] = shlex.split(flags) if sep else ([] if label == ZERO_SHOT
                                                      else ["--method", label])
    return runs


def common_flags(args) -> list[str]:
    """What every run of the protocol shares: model, task sample, and the dev examples."""
    flags = ["--model", args.model, "--task", args.task, "--k", str(args.k),
             "--eval-examples", str(args.eval_examples), "--max-seq-length",
             str(args.max_seq_length)]
    return flags + (["--data", args.data] if args.data else [])


def train_command(job: Job, args) -> list[str]:
    return [sys.executable, "-m", "pocketllm.cli", "train", *common_flags(args),
            "--seed", str(job.seed), "--threads", "1", "--time-budget", str(args.budget_minutes),
            "--budget-clock", args.budget_clock,
            "--keep-best", "--steps-per-eval", str(args.steps_per_eval), "--save-every",
            str(args.steps_per_eval), "--adapter-path", str(job.out), *job.flags,
            *(["--resume"] if (job.out / "config.yaml").exists() else [])]


def eval_command(job: Job, args) -> list[str]:
    cmd = [sys.executable, "-m", "pocketllm.cli", "eval", *common_flags(args), "--seed",
           str(job.seed), "--split", "test", "--json-out", str(job.out / RESULT)]
    if job.trains:
        best = job.out / "best"
        cmd += ["--adapter-path", str(best if best.exists() else job.out)]
    return cmd


def run_job(job: Job, args, core: int | None) -> dict:
    """Train (unless zero-shot) and score one (run, seed); its result record."""
    job.out.mkdir(parents=True, exist_ok=True)

    def pin():  # one run per core: two runs side by side do not share one
        if core is not None:
            os.sched_setaffinity(0, {core})
    # built in turn: the scoring command looks for the adapter the training kept
    for make in ([train_command] if job.trains else []) + [eval_command]:
        cmd = make(job, args)
        with open(job.out / "protocol.log", "a") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        if rc != 0:
            raise SystemExit(f"{job.label} seed {job.seed} failed (exit {rc}): see "
                             f"{job.out / 'protocol.log'}")
    res = json.loads((job.out / RESULT).read_text())
    summary = job.out / "summary.json"
    s = json.loads(summary.read_text()) if job.trains else {}
    best = (s.get("best") or {}) if s else {}
    return {"label": job.label, "seed": job.seed, "accuracy": res["accuracy"],
            "macro_f1": res.get("macro_f1"), "loss": res["loss"],
            "train_minutes": s.get("train_seconds", 0.0) / 60, "steps": s.get("steps", 0),
            "best_step": best.get("step"), "peak_rss_mb": s.get("peak_rss_mb")}


def accuracy(args) -> int:
    """Run (or resume) the protocol and write its table, CSV and plot."""
    runs = parse_runs(list(args.runs))
    seeds = list(args.seeds)  # integers in range: the flag checked them
    out = Path(args.out)
    jobs = [Job(label, seed, flags, out / label / f"seed{seed}")
            for label, flags in runs.items() for seed in seeds]
    cores = sorted(os.sched_getaffinity(0))
    t0 = time.time()
    results: list[dict] = []
    todo = []
    for job in jobs:
        done = job.out / RESULT
        if done.exists() and (not job.trains or (job.out / "summary.json").exists()):
            results.append(json.loads((job.out / "record.json").read_text()))
        else:
            todo.append(job)
    print(f"{len(jobs)} runs ({len(results)} done before), {args.jobs} at a time, "
          f"{args.budget_minutes:g} training minutes each", flush=True)
    # one core per run slot where there are enough cores: two runs never share one
    pin = args.jobs > 1 and args.jobs <= len(cores)
    free: queue.Queue = queue.Queue()
    for i in range(max(1, args.jobs)):
        free.put(cores[i] if pin else None)

    def one(job: Job) -> dict:
        core = free.get()
        try:
            rec = run_job(job, args, core)
        finally:
            free.put(core)
        (job.out / "record.json").write_text(json.dumps(rec))
        print(f"[{time.time() - t0:6.0f}s] {job.label} seed {job.seed}: dev accuracy "
              f"{rec['accuracy']:.1%} after {rec['train_minutes']:.1f} training min, "
              f"{rec['steps']} steps (best on valid: step {rec['best_step']})", flush=True)
        return rec
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results += list(pool.map(one, todo))
    write_outputs(results, runs, seeds, args, out)
    return 0


def write_outputs(results: list[dict], runs: dict, seeds: list[int], args, out: Path) -> None:
    """accuracy.md, accuracy.csv and accuracy.png under `out`."""
    import csv
    by = {(r["label"], r["seed"]): r for r in results}
    keys = ["label", "seed", "accuracy", "macro_f1", "loss", "train_minutes", "steps",
            "best_step", "peak_rss_mb"]
    with open(out / "accuracy.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for label in runs:
            for seed in seeds:
                w.writerow({k: by[label, seed].get(k) for k in keys})
    lines = [f"# {args.task} k={args.k}: dev accuracy, {len(seeds)} seeds, "
             f"{args.budget_minutes:g} training minutes per run"
             + (" (CPU minutes)" if args.budget_clock == "cpu" else ""), "",
             f"Command: `{command_line(args)}`  ",
             f"Model: {args.model}; one thread per run, {args.jobs} at a time; the adapter "
             "kept on the valid split is scored once on the dev/test split.", "",
             "| run | mean % | std | " + " | ".join(f"seed {s}" for s in seeds) +
             " | train min | flags |", "|---|---|---|" + "---|" * len(seeds) + "---|---|"]
    for label, flags in runs.items():
        accs = [100 * by[label, s]["accuracy"] for s in seeds]
        std = f"{statistics.stdev(accs):.1f}" if len(accs) > 1 else "-"  # one seed: no spread
        mins = statistics.mean(by[label, s]["train_minutes"] for s in seeds)
        lines.append(f"| {label} | {statistics.mean(accs):.1f} | {std} | " +
                     " | ".join(f"{a:.1f}" for a in accs) +
                     f" | {mins:.1f} | `{shlex.join(flags)}` |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    plot(runs, seeds, out)
    print(f"wrote {out / 'accuracy.md'}, accuracy.csv, accuracy.png", flush=True)


def command_line(args) -> str:
    """The `pocketllm bench accuracy` command that gives these settings."""
    import dataclasses
    parts = ["pocketllm", "bench", "accuracy"]
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        parts += [f"--{f.name.replace('_', '-')}", *(map(str, v) if isinstance(v, list)
                                                     else [str(v)])]
    return shlex.join(parts)


def plot(runs: dict, seeds: list[int], out: Path) -> None:
    """Valid accuracy against training minutes, one line per (run, seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, label in enumerate(runs):
        color = f"C{i}"
        for j, seed in enumerate(seeds):
            metrics = out / label / f"seed{seed}" / "metrics.jsonl"
            if not metrics.exists():
                continue
            pts = [(r["wall"] / 60, 100 * r["eval_accuracy"])
                   for r in map(json.loads, metrics.read_text().splitlines())
                   if r.get("eval_accuracy") is not None]
            if pts:
                ax.plot(*zip(*pts), color=color, alpha=0.6, marker=".",
                        label=label if j == 0 else None)
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_ylabel("valid accuracy %")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
