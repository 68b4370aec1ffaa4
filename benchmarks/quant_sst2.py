"""SST-2 k=16 (seed 42) dev accuracy of the default zeroth-order method (prge, its FZOO
defaults) on a float, an int8 and a 4-bit frozen base, each on the same short CPU-time budget.

    python benchmarks/quant_sst2.py [--budget 3] [--eval-examples 500]
    python benchmarks/quant_sst2.py --steps 40     # each scheme the same number of steps
    python benchmarks/quant_sst2.py --steps 40 --engine onnxruntime   # the base in the program

Each run is an ordinary `pocketllm train --task sst2 --k 16 --seed 42 --method prge
--quantize-base S --time-budget B --budget-clock cpu --threads 1` in a fresh process, one after
the other; the zero-shot figure ("before") is each base's own. With --steps N, each run makes
N steps instead (`--iters N --lr-schedule constant`, no budget): the 4-bit matmul is slower on
this CPU, so on a CPU-time budget the 4-bit run makes fewer steps, which mixes the
quantization error with a shorter run; equal steps compare the bases alone. A short budget, one seed: a
smoke-level comparison, not the protocol's five seeds. Needs /work/shared/data/sst2 (or
$POCKETLLM_DATA). Writes benchmarks/results/quant_sst2.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _run import ROOT, write_table

sys.path.insert(0, str(ROOT))
from pocketllm.bench.machine import describe  # noqa: E402

SCHEMES = ("none", "int8", "int4")
QUANT = ("int8 / int4 (torch): the base's Linears in 8 / 4 bits and its embedding table (the "
         "tied head) in int8 rows (pocketllm/quantize.py; the 4-bit matmul in bfloat16).",
         "int8 / int4 (a program engine): the base's Linears as ONNX Runtime MatMulNBits, 8 / "
         "4 bits per weight, float32 activations; int8-dynamic: MatMulInteger, int8 weights "
         "per channel and activations quantized to 8 bits per call; with each, the embedding "
         "table (the tied head) in int8 rows (pocketllm/engines/onnxruntime_engine.py). Train s "
         "counts the steps only; the programs' export is outside it.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=3.0, help="CPU minutes of steps per run")
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--steps", type=int, default=0,
                    help="N steps per run instead of the CPU-time budget (0: the budget)")
    ap.add_argument("--schemes", default=",".join(SCHEMES),
                    help="the schemes to run, in this order (the table: those run so far)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "quant_sst2"))
    ap.add_argument("--engine", default="torch",
                    help="what runs the forwards (train --engine): torch quantizes the model at "
                         "load, a program engine its exported programs")
    ap.add_argument("--flags", default="", help="more `pocketllm train` flags for every run "
                    "(e.g. '--lora-layers 4'); its runs and table get --tag in their names")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    if a.tag:
        a.runs += f"_{a.tag}"
    if a.steps:
        a.runs += f"_steps{a.steps}"
    engine = []
    if a.engine != "torch":
        a.runs += f"_{a.engine}"
        engine = ["--engine", a.engine, "--program-cache", str(Path(a.runs) / "programs")]
    length = (["--iters", str(a.steps), "--lr-schedule", "constant"] if a.steps else
              ["--iters", "1000", "--time-budget", str(a.budget), "--budget-clock", "cpu"])
    rows, load = [], os.getloadavg()[0]
    for scheme in a.schemes.split(","):
        out = Path(a.runs) / scheme
        cmd = [sys.executable, "-m", "pocketllm.cli", "train", "--task", "sst2", "--k", "16",
               "--seed", "42", "--method", "prge", "--quantize-base", scheme, *length,
               "--threads", "1", "--eval-examples", str(a.eval_examples),
               "--adapter-path", str(out), *engine, *shlex.split(a.flags)]
        if not (out / "summary.json").exists():
            t0 = time.time()
            r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
            print(f"{scheme}: {time.time() - t0:.0f} s", flush=True)
        s = json.loads((out / "summary.json").read_text())
        acc = lambda r: "-" if not r or r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}"
        rows.append([scheme, acc(s["before"]), acc(s["after"]), s["steps"],
                     f"{s['train_seconds']:.0f}", f"{s['peak_rss_mb']:.0f}"])
        print(rows[-1], flush=True)
    length_note = (f"{a.steps} steps per run at a constant learning rate (--iters {a.steps} "
                   "--lr-schedule constant)" if a.steps else
                   f"{a.budget:g} CPU-minutes of steps per run (--budget-clock cpu, --iters 1000)")
    fair = ("the runs make the same steps" if a.steps else
            "the CPU-time budget is what keeps the runs comparable")
    where = ("torch (the model quantized at load)" if a.engine == "torch" else
             f"--engine {a.engine} (the float model exported, its program's base quantized)")
    name = ("quant_sst2" + ("" if a.engine == "torch" else f"_{a.engine}")
            + (f"_{a.tag}" if a.tag else "") + ".md")
    write_table(name, f"SST-2 k=16 seed 42: prge on a float / int8 / 4-bit base, {where}",
                "python benchmarks/quant_sst2.py " + " ".join(sys.argv[1:]), describe(),
                ["--quantize-base", "zero-shot dev acc %", "after dev acc %", "steps",
                 "train s (steps only)", "peak RSS MB"], rows,
                f"""
Default model (smollm2-135m), prge with its defaults (FZOO estimate, q=8, rademacher, eps 1e-3,
lr 1e-2), LoRA{" (" + a.flags + ")" if a.flags else ""}, one thread, {length_note}, dev accuracy on {a.eval_examples} dev examples after
it (the final adapter, not the kept best). {QUANT[a.engine != "torch"]} One seed and a short budget: differences of a few points are within the run-to-run
spread of this protocol (benchmarks/results/accuracy_protocol.md: +- 3.1 over five seeds).
Load average when this table was written: {load:.1f} (a run measured before and kept in
--runs may have run at another; other jobs shared the 2 cores: {fair}).
""")


if __name__ == "__main__":
    main()
