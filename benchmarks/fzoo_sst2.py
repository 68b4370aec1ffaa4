"""FZOO (`prge --estimator fzoo`, arXiv 2506.09034) on SST-2 k=16: dev accuracy against
training wall-clock, beside prge_convergence.md's zo-sgd and prge q=4 figures.

Each run is an ordinary `pocketllm train --task sst2 ... --test-every N` in a fresh process,
pinned to one core (`taskset -c --core`), with prge_convergence.py's shared flags (same seed,
data, LoRA, per-query batch) and `--keep-best` (valid split every --test-every steps, so the
kept adapter's dev accuracy is the curve's at its step). One run per --lr; a finished run (its
summary.json) is not run again, and `--table` only rebuilds the table.

    python benchmarks/fzoo_sst2.py --lr 1e-2 --iters 400 --eval-examples 500 --threads 1
    python benchmarks/fzoo_sst2.py --model tiny-llama --k 4 --iters 4 --test-every 2 \
        --eval-examples 16 --lr 1e-2 --runs /tmp/fz --out /tmp/fz.md       # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _run import ROOT, curve, write_table
from prge_convergence import common


def flags(a, lr: float) -> list[str]:
    """This run's own flags after prge_convergence's shared ones."""
    return ["--method", "prge", "--estimator", "fzoo", "--queries", str(a.queries),
            "--perturbation", "rademacher", "--eps", str(a.eps), "--learning-rate", str(lr),
            "--iters", str(a.iters), "--keep-best", "--steps-per-eval", str(a.test_every)]


def row(a, lr: float, run: Path) -> list:
    from pocketllm.train import read_best
    pts = curve(run)
    s = json.loads((run / "summary.json").read_text())
    best = read_best(run / "best")
    kept = next((acc for _, acc, step in pts if best and step == best["step"]), None)
    peak = max(pts, key=lambda p: p[1]) if pts else None
    first66 = next((w for w, acc, _ in pts if acc >= 0.662 - 1e-9), None)
    return [f"fzoo q={a.queries}, lr {lr:g}", s["steps"], f"{pts[-1][0]:.0f}" if pts else "-",
            f"{pts[-1][0] / max(s['steps'], 1):.2f}" if pts else "-",
            f"{100 * pts[-1][1]:.1f}" if pts else "-",
            f"{100 * peak[1]:.1f} (step {peak[2]}, {peak[0]:.0f} s)" if peak else "-",
            "-" if first66 is None else f"{first66:.0f}",
            "-" if best is None else f"step {best['step']}: {100 * kept:.1f}"
            if kept is not None else f"step {best['step']}", f"{s['peak_rss_mb']:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="", help="SST-2 folder (default: the task's)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 rank)")
    ap.add_argument("--batch-size", type=int, default=2, help="per-query batch")
    ap.add_argument("--queries", type=int, default=8, help="FZOO's N")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--test-every", type=int, default=25)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--core", type=int, default=1, help="taskset core (-1: not pinned)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "fzoo_sst2"))
    ap.add_argument("--out", default="fzoo_sst2.md")
    ap.add_argument("--table", action="store_true", help="only rebuild the table")
    a = ap.parse_args()
    load = os.getloadavg()
    runs = {lr: Path(a.runs) / f"fzoo-q{a.queries}-lr{lr:g}" for lr in a.lr}
    cmds = {lr: [sys.executable, "-m", "pocketllm.cli", "train", *common(a), *flags(a, lr),
                 "--adapter-path", str(run)] for lr, run in runs.items()}
    pin = ["taskset", "-c", str(a.core)] if a.core >= 0 else []
    for lr, run in runs.items():
        if a.table or (run / "summary.json").exists():
            continue
        run.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        log_path = run.parent / f"{run.name}.log"
        with open(log_path, "w") as log:
            r = subprocess.run(pin + cmds[lr], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode:
            raise SystemExit(f"lr {lr:g} failed (see {log_path})")
        print(f"lr {lr:g}: {time.time() - t0:.0f}s", flush=True)
    from pocketllm.bench.machine import describe
    rows = [row(a, lr, run) for lr, run in runs.items() if (run / "summary.json").exists()]
    shown = " ".join(pin + ["pocketllm", "train", *common(a), *flags(a, a.lr[0])])
    notes = f"""
- each run: `{shown} --adapter-path ...` (one run per --lr: its --learning-rate).
- dev set: SST-2 validation, {a.eval_examples or 'all'} examples, every {a.test_every} steps;
  "train s" excludes evaluation. "kept (--keep-best)": the step the 32-example valid split
  picked and that adapter's dev accuracy.
- load average (1/5/15 min) at start: {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, at end:
  {'/'.join(f'{x:.2f}' for x in os.getloadavg())}.
"""
    write_table(a.out, f"FZOO on SST-2 ({a.model}, k={a.k}, seed {a.seed})",
                " ".join(["python", "benchmarks/fzoo_sst2.py", *sys.argv[1:]]), describe(),
                ["run", "steps", "train s", "s/step", "final dev acc %", "best dev acc %",
                 "time to 66.2% (s)", "kept (--keep-best): dev acc %", "peak RSS MB"],
                rows, notes)


if __name__ == "__main__":
    main()
