"""Peak RSS of a whole `pocketllm train` run with evaluations, torch against ONNX Runtime: the
default model, SST-2 k=16, zo-sgd LoRA, batch 2, 4 steps, valid evaluated every 2 steps and the
dev set (32 examples) before and after. Each run is a fresh process; its peak (VmHWM, read at
exit) covers the model load, every evaluation and the steps. The engine's programs are exported
by a first run (its wall time reported) and the measured run loads them from the cache.

    python benchmarks/engine_train_rss.py --cache DIR [--threads 2]"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._run import write_table  # noqa: E402
from benchmarks.engines import machine  # noqa: E402

CHILD = r'''
import atexit, sys, runpy
def hwm():
    kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print("VMHWM", kb / 1024, flush=True)
atexit.register(hwm)
sys.argv = ["pocketllm", *sys.argv[1:]]
runpy.run_module("pocketllm.cli", run_name="__main__")
'''


def run(engine: str, out: Path, cache: Path, threads: int) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-c", CHILD, "train", "--task", "sst2", "--k", "16",
           "--model", "smollm2-135m", "--method", "zo-sgd", "--batch-size", "2",
           "--max-seq-length", "32", "--iters", "4", "--steps-per-eval", "2",
           "--eval-examples", "32", "--eval-batch-size", "8", "--save-every", "0",
           "--threads", str(threads), "--seed", "1", "--engine", engine,
           "--program-cache", str(cache), "--adapter-path", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                            "HOME": str(Path.home())})
    if r.returncode:
        raise SystemExit(f"{engine}: {r.stderr[-3000:]}")
    peak = float(next(l.split()[1] for l in r.stdout.splitlines() if l.startswith("VMHWM")))
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").open()]
    after = [m for m in metrics if m.get("test_loss") is not None][-1]
    return peak, time.perf_counter() - t0, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    where = machine()
    tmp = Path(tempfile.mkdtemp(prefix="pocketllm-train-rss-"))
    cache = Path(a.cache)
    rows = []
    for engine in ("torch", "onnxruntime"):
        export = ""
        if engine != "torch":
            _, wall, _ = run(engine, tmp / f"{engine}-export", cache, a.threads)
            export = f"{wall:.0f}"
        peak, wall, after = run(engine, tmp / engine, cache, a.threads)
        rows.append([engine, f"{peak:.0f}", f"{after['test_loss']:.5f}",
                     f"{after['test_accuracy']:.3f}", f"{wall:.0f}", export])
        print(rows[-1], flush=True)
    end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write_table("engine_train_rss.md", "A whole train run with evaluations: peak RSS, torch "
                "against ONNX Runtime", "python benchmarks/engine_train_rss.py " +
                " ".join(sys.argv[1:]), f"{where}; at end: {end}",
                ["engine", "peak RSS of the run MB", "dev loss after", "dev accuracy after",
                 "run wall s", "export run wall s"], rows, NOTES)


NOTES = """
The engine run evaluates through its eval programs (the torch model's frozen weights released
before the first program loads; training's and evaluation's programs never loaded together);
its dev figures after training should equal torch's to the engines' tolerance (the same seeds,
the same z). Wall times include the model load and are disturbed by the machine's load.
"""


if __name__ == "__main__":
    main()
