"""Peak RSS of inference and of each training method at the same batch, each in a fresh process.

    python benchmarks/memory_table.py [--model smollm2-135m] [--batch-size 8] [--seq 64] [--dtype float32]

"peak (run)" is the high-water mark from just after loading through a few steps (the kernel's
counter is reset once the model is in memory), which is what tells the methods apart; "peak
(process)" also includes loading the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _run import run_mode, write_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pocketllm.bench.machine import describe  # noqa: E402

MODES = [("inference", "inference (forward + loss, no grad)"),
         ("zo-full", "zo-sgd, full parameters"),
         ("zo-lora", "zo-sgd, LoRA r=8 q/v"),
         ("naive-zo-full", "naive MeZO reference, full parameters"),
         ("lora-adam", "lora-adam (backprop), LoRA r=8 q/v")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="memory.md")
    a = ap.parse_args()
    res = {}
    for mode, _ in MODES:
        res[mode] = run_mode(mode, model=a.model, batch_size=a.batch_size, seq=a.seq,
                             dtype=a.dtype, steps=a.steps)
        print(mode, res[mode], flush=True)
    inf = res["inference"]["peak_run_mb"]
    rows = []
    for mode, label in MODES:
        r = res[mode]
        rows.append([label, f"{r['peak_run_mb']:.0f}", f"{r['peak_run_mb'] / inf:.3f}",
                     f"{max(r['peak_run_mb'], r['peak_load_mb']):.0f}", f"{r['step_s_median']:.2f}"])
    cmd = "python benchmarks/memory_table.py " + " ".join(sys.argv[1:])
    write_table(a.out, f"Peak memory by method ({a.model}, {a.dtype}, batch {a.batch_size} x {a.seq})",
                cmd.strip(), describe(),
                ["run", "peak RSS (run) MB", "vs inference", "peak RSS (process) MB", "step s"],
                rows, __doc__.split("\n\n", 2)[2])


if __name__ == "__main__":
    main()
