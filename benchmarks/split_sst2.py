"""SST-2 dev accuracy against training time: split mode beside local zo-sgd and lora-adam.

Starts a `pocketllm serve` on loopback, runs `pocketllm train --task sst2 --method side ...`
for each split config (a finished run, with its summary.json, is not run again), and tabulates
the dev accuracy every `--test-every` steps against training seconds (`wall` in metrics.jsonl:
steps only, evaluation excluded), with the local runs of benchmarks/sst2.py (runs/sst2/NAME)
where they exist. "time to zo-sgd's final" is the first training time at which a run reaches
the final dev accuracy of the local zo-sgd run with the same k.

    python benchmarks/split_sst2.py --only k16-side-8bit --threads 1
    python benchmarks/split_sst2.py --smoke          # tiny: a few steps, 64 dev examples
    python benchmarks/split_sst2.py --table
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _run import RESULTS, ROOT, curve, start_server

RUNS = ROOT / "runs" / "sst2-split"
LOCAL = ROOT / "runs" / "sst2"
COMMON = ["--task", "sst2", "--seed", "42", "--save-every", "0", "--steps-per-report", "10",
          "--eval-batch-size", "32", "--no-eval-before", "--method", "side", "--batch-size", "16"]
CONFIGS = {
    "k16-side-8bit":  (16, ["--iters", "250", "--test-every", "50", "--act-bits", "8"]),
    "k16-side-4bit":  (16, ["--iters", "250", "--test-every", "50", "--act-bits", "4"]),
    # few-shot: a smaller side network (width 8 on every 4th layer) with weight decay, against
    # the over-fitting of the default one on 32 examples
    "k16-side-small": (16, ["--iters", "250", "--test-every", "50", "--act-bits", "8",
                            "--side-width", "8", "--tap-every", "4", "--weight-decay", "0.1"]),
    "k512-side-8bit": (512, ["--iters", "250", "--test-every", "50", "--act-bits", "8"]),
    "k512-side-4bit": (512, ["--iters", "250", "--test-every", "50", "--act-bits", "4"]),
}
COMPARE = ("zo-lora", "lora-adam")


def table(smoke: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from pocketllm.bench.machine import describe
    rows = []
    names = ["smoke"] if smoke else list(CONFIGS)
    for k in (16, 512):
        local = {c: curve(LOCAL / f"k{k}-{c}") for c in COMPARE}
        target = local["zo-lora"][-1][1] if local["zo-lora"] else None
        runs = [(f"k{k}-{c} (local)", local[c]) for c in COMPARE] + \
               [(n, curve(RUNS / n)) for n in names if smoke or CONFIGS[n][0] == k]
        for name, pts in runs:
            if not pts:
                continue
            reach = next((t for t, acc, _ in pts if target is not None and acc >= target), None)
            rows.append([name, f"{pts[-1][2]}", f"{pts[-1][0] / 60:.1f}", f"{pts[-1][1] * 100:.1f}",
                         " → ".join(f"{acc * 100:.0f}@{t / 60:.1f}m" for t, acc, _ in pts),
                         "-" if reach is None else f"{reach / 60:.1f}"])
        if smoke:
            break
    lines = ["# SST-2 dev accuracy against training time: split mode vs local training", "",
             f"Command: `python benchmarks/split_sst2.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {describe()}  ", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
             f"Load average now (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}", "",
             "| run | steps | train min | final dev acc % | dev acc % @ train minutes | "
             "min to zo-sgd's final |", "|---|---|---|---|---|---|",
             *["| " + " | ".join(r) + " |" for r in rows], "",
             __doc__.split("\n\n")[1].strip()]
    name = "split_sst2_smoke.md" if smoke else "split_sst2.md"
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny run to check the pipeline")
    a = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if not a.table:
        todo = {"smoke": (16, ["--iters", "6", "--test-every", "3", "--eval-examples", "64",
                               "--eval-batch-size", "16"])} if a.smoke else \
            {n: CONFIGS[n] for n in (a.only or CONFIGS)}
        with tempfile.TemporaryDirectory() as tmp:
            proc, addr, token = start_server(Path(tmp), a.threads, log=RUNS / "server.log")
            try:
                for name, (k, flags) in todo.items():
                    if (RUNS / name / "summary.json").exists() and name != "smoke":
                        continue
                    cmd = [sys.executable, "-m", "pocketllm.cli", "train", *COMMON, "--k", str(k),
                           *flags, "--server", addr, "--token-file", str(token),
                           "--adapter-path", str(RUNS / name)]
                    if a.threads:
                        cmd += ["--threads", str(a.threads)]
                    with open(RUNS / f"{name}.log", "w") as log:
                        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            finally:
                proc.terminate()
                proc.wait()
    table(a.smoke)


if __name__ == "__main__":
    main()
