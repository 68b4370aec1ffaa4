"""SST-2 dev accuracy against wall-clock: zo-sgd LoRA (q=1, sequential) vs P-RGE (q=4, one
batched forward) vs P-RGE with ZO-Adam, same seed, data and LoRA; with two more rows: prge at
zo-sgd's rows per step, and the control, zo-sgd at prge's per-query batch.

Each run is an ordinary `pocketllm train --task sst2 ... --test-every N` in a fresh process,
writing runs/prge_convergence/<name>/ (metrics.jsonl holds `test_accuracy` and `wall`, the
training seconds so far). A finished run (its summary.json) is not run again, so runs can be
spread over invocations (`--only NAME`) and the plot and table rebuilt from what is there
(`--table`). Runs go one after the other, or with `--jobs 2 --threads 1` two at a time, each
pinned to its own core, so that a baseline and its rival share the same machine and time window.

    python benchmarks/prge_convergence.py [--k 16] [--iters 400] [--prge-iters 200] [--test-every 25]
    python benchmarks/prge_convergence.py --rank 8 --iters 200 --prge-batch-size 2 \
        --test-every 25 --eval-examples 500 --threads 1 --jobs 2 --adam-lr 1e-2
        # what benchmarks/results/prge_convergence.md ran (~40 min)
    python benchmarks/prge_convergence.py --table
    python benchmarks/prge_convergence.py --model tiny-llama --k 4 --iters 6 --prge-iters 4 \
        --test-every 2 --eval-examples 16 --runs /tmp/conv --out /tmp/conv.md    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from _run import RESULTS, ROOT, curve, write_table

# name -> (label, flags); the iteration count comes from --iters / --prge-iters
CONFIGS = {
    "zo-sgd-q1": ("zo-sgd LoRA, q=1, sequential +/-",
                  ["--method", "zo-sgd", "--zo-passes", "sequential"]),
    "prge-q4": ("prge q=4, --parallel both (one forward)",
                ["--method", "prge", "--queries", "4", "--parallel", "both"]),
    "prge-q4-adam": ("prge q=4, both, ZO-Adam",
                     ["--method", "prge", "--queries", "4", "--parallel", "both",
                      "--zo-optimizer", "adam"]),
    # prge with zo-sgd's rows per forward: per-query batch = zo-sgd's batch / 4
    "prge-q4-wide": ("prge q=4, both, batch / 4 (as many rows a step as zo-sgd)",
                     ["--method", "prge", "--queries", "4", "--parallel", "both"]),
    # the control: zo-sgd at prge's per-query batch, so that what P-RGE's queries bring is
    # not confused with what a small batch brings
    "zo-sgd-q1-small": ("zo-sgd LoRA, q=1, sequential +/-, prge's batch",
                        ["--method", "zo-sgd", "--zo-passes", "sequential"]),
}
BASELINE = "zo-sgd-q1"


def common(a) -> list[str]:
    """The `pocketllm train` flags every run shares."""
    cmd = ["--model", a.model, "--task", "sst2", "--k", str(a.k), "--seed", str(a.seed),
           "--trainable", "lora", "--lora-rank", str(a.rank), "--lora-alpha", str(2 * a.rank),
           "--batch-size", str(a.batch_size), "--test-every", str(a.test_every),
           "--eval-examples", str(a.eval_examples), "--steps-per-eval", "0", "--save-every",
           "0", "--steps-per-report", "10", "--eval-batch-size", "32"]
    if a.data:
        cmd += ["--data", a.data]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    return cmd


def command(a, name: str) -> list[str]:
    _, flags = CONFIGS[name]
    iters = a.iters if name == BASELINE else a.prge_iters or a.iters
    lr = a.adam_lr if "adam" in name else a.prge_lr or a.lr if "prge" in name else a.lr
    cmd = [sys.executable, "-m", "pocketllm.cli", "train", *common(a), "--iters", str(iters),
           "--adapter-path", str(Path(a.runs) / name), *flags]
    if name == "prge-q4-wide":
        cmd += ["--batch-size", str(max(1, a.batch_size // 4))]  # the later flag wins
    elif name != BASELINE and a.prge_batch_size:  # prge's runs and the small-batch control
        cmd += ["--batch-size", str(a.prge_batch_size)]
    return cmd + (["--learning-rate", str(lr)] if lr else [])


def time_to(points, acc: float) -> float | None:
    """Training seconds at the first evaluation reaching `acc` (None: never)."""
    return next((w for w, a, _ in points if a >= acc - 1e-9), None)


def report(a, cmds: dict[str, list[str]], load: tuple) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pocketllm.bench.machine import describe
    runs = {n: Path(a.runs) / n for n in CONFIGS if (Path(a.runs) / n / "summary.json").exists()}
    curves = {n: curve(r) for n, r in runs.items()}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, pts in curves.items():
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ms=3,
                label=CONFIGS[n][0])
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title(f"SST-2, {a.model}, k={a.k}, seed {a.seed}")
    ax.grid(alpha=0.3)
    ax.legend()
    png = RESULTS / (Path(a.out).stem + ".png") if not Path(a.out).is_absolute() \
        else Path(a.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    base = curves.get(BASELINE)
    target = base[-1][1] if base else None
    t_base = time_to(base, target) if base else None
    rows = []
    for n, pts in curves.items():
        s = json.loads((runs[n] / "summary.json").read_text())
        t = time_to(pts, target) if target is not None else None
        # training seconds: the runs' own clock at their last (after-training) evaluation,
        # evaluation excluded (summary.json's train_seconds, the same clock since the one loop)
        train_s = pts[-1][0] if pts else 0.0
        rows.append([CONFIGS[n][0], s["steps"], f"{train_s:.0f}",
                     f"{train_s / max(s['steps'], 1):.2f}",
                     f"{100 * pts[0][1]:.1f}" if pts else "-",
                     f"{100 * pts[-1][1]:.1f}" if pts else "-",
                     f"{100 * max(p[1] for p in pts):.1f}" if pts else "-",
                     "-" if t is None else f"{t:.0f}",
                     "-" if t is None or not t_base else f"{t / t_base:.2f}",
                     f"{s['peak_rss_mb']:.0f}"])
    cmd = " ".join(["python", "benchmarks/prge_convergence.py", *sys.argv[1:]])
    notes = f"""
![accuracy vs wall-clock]({png.name})

- every run: `pocketllm train {' '.join(common(a))}` and its own flags:
  {'; '.join(f'{n}: `' + ' '.join(cmds[n][cmds[n].index('--iters'):]) + '`' for n in CONFIGS)}.
- "time to zo-sgd final": training seconds (evaluation excluded) until the run's dev accuracy
  first reaches the accuracy zo-sgd ends at ({'-' if target is None else f'{100 * target:.1f}%'});
  "vs zo-sgd" is that time over zo-sgd's own. Target (issue 5): prge at most 0.5.
- dev set: SST-2 validation, {a.eval_examples or 'all'} examples, every {a.test_every} steps.
- load average (1/5/15 min) at start: {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, at end:
  {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; {'runs one after the other' if a.jobs == 1
  else f'{a.jobs} runs at a time, each pinned to its own core'}.
"""
    write_table(a.out, f"P-RGE convergence on SST-2 ({a.model}, k={a.k})", cmd, describe(),
                ["run", "steps", "train s", "s/step", "first dev acc %", "final dev acc %",
                 "best dev acc %", "time to zo-sgd final (s)", "vs zo-sgd", "peak RSS MB"],
                rows, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="", help="SST-2 folder (default: the task's)")
    ap.add_argument("--k", type=int, default=16, help="training examples per class")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 rank)")
    ap.add_argument("--batch-size", type=int, default=16, help="zo-sgd's batch (and prge's "
                    "per-query batch unless --prge-batch-size)")
    ap.add_argument("--prge-batch-size", type=int, default=0,
                    help="prge's per-query batch (0: --batch-size); --batch-size 16 "
                    "--prge-batch-size 4 gives both 32 rows per forward")
    ap.add_argument("--iters", type=int, default=400, help="zo-sgd steps")
    ap.add_argument("--prge-iters", type=int, default=0, help="prge steps (0: --iters)")
    ap.add_argument("--lr", type=float, default=0.0, help="sgd learning rate (0: method default)")
    ap.add_argument("--prge-lr", type=float, default=0.0,
                    help="prge's sgd learning rate (0: --lr). q queries average q estimates, "
                    "so the step is less noisy and can be larger")
    ap.add_argument("--adam-lr", type=float, default=1e-4, help="ZO-Adam learning rate")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs side by side, each pinned to its own core (taskset); use with "
                    "--threads 1 so that every run sees the same machine")
    ap.add_argument("--test-every", type=int, default=25)
    ap.add_argument("--eval-examples", type=int, default=872)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), default=None)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "prge_convergence"))
    ap.add_argument("--out", default="prge_convergence.md", help="results file (and .png)")
    ap.add_argument("--table", action="store_true", help="only rebuild the plot and table")
    a = ap.parse_args()
    load = os.getloadavg()
    cmds = {n: command(a, n) for n in CONFIGS}
    if not a.table:
        Path(a.runs).mkdir(parents=True, exist_ok=True)
        todo = [n for n in a.only or CONFIGS if not (Path(a.runs) / n / "summary.json").exists()]
        failed = []

        def worker(slot: int) -> None:
            """Runs from the shared list, one at a time, pinned to core `slot` with --jobs > 1."""
            while todo and not failed:
                name = todo.pop(0)
                pin = ["taskset", "-c", str(slot)] if a.jobs > 1 else []
                t0 = time.time()
                with open(Path(a.runs) / f"{name}.log", "w") as log:
                    r = subprocess.run(pin + cmds[name], cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT)
                if r.returncode:
                    failed.append(f"{name} failed (see {Path(a.runs) / f'{name}.log'}): "
                                  f"{' '.join(cmds[name])}")
                print(f"{name}: {time.time() - t0:.0f}s", flush=True)
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(a.jobs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if failed:
            raise SystemExit("\n".join(failed))
    report(a, cmds, load)


if __name__ == "__main__":
    main()
