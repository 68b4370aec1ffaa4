"""A quantized base inside an engine's program (`--engine E --quantize-base S`), default model:
the program's size, a prge q=4 step through it (batch 2 x 64, every position scored: the
workload's language-modelling loss) in a fresh process, and the program alone loaded and called
twice in another (`engine_memory.py`'s child: torch imported, as a pocketllm host has it).

    python benchmarks/engine_quant.py --cache DIR [--pairs torch:none executorch:int8-dynamic ...]
        [--rounds R]

A pair's first workload run exports its program into DIR (its wall time reported: the float
model loaded, exported, quantized); the measured runs load it from there. Peak RSS of the
workload's steps (`peak_run_mb`) starts from the float torch model's load, which the engine
then releases; the program-alone column is what a host that never loads the torch model holds.
Writes benchmarks/results/engine_quant.md."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._run import run_mode, write_table  # noqa: E402
from benchmarks.engine_memory import ORT_OPTIONS, measure  # noqa: E402
from benchmarks.engines import machine  # noqa: E402

PAIRS = ("torch:none", "torch:int8-dynamic", "onnxruntime:none", "onnxruntime:int4",
         "onnxruntime:int8-dynamic", "executorch:int8-dynamic")
# how the program-alone child loads a program: as the engine does (engine_memory.ORT_OPTIONS)
LOAD = {"onnxruntime": dict(zip(("attrs", "config", "kwargs"), ORT_OPTIONS[
    "no constant folding + no memory pattern (the engine's load)"]))}
SUFFIX = {"executorch": ".pte", "onnxruntime": ".onnx"}


def cached(cache: Path, engine: str, scheme: str, shared: bool = False) -> tuple[Path, Path]:
    """(program, its record) of the step program of `engine` with base `scheme` in `cache`
    (`shared`: one that runs the layers below the adapter once, `--lora-layers`)."""
    for rec in sorted(cache.glob("*.json")):
        key = json.loads(rec.read_text()).get("key", {})
        if (key.get("engine") == engine and key.get("quantize", "none") == scheme
                and "kind" not in key and ("shared" in key) == shared):
            return rec.with_suffix(SUFFIX[engine]), rec
    raise SystemExit(f"no {engine} {scheme} step program in {cache}")


def program_bytes(path: Path) -> int:
    """The program file, and for ONNX the weights files its graph names."""
    size = path.stat().st_size
    if path.suffix == ".onnx":
        import onnx
        from pocketllm.engines.onnxruntime_engine import _external
        graph = onnx.load(str(path), load_external_data=False)
        size += sum((path.parent / name).stat().st_size for name in
                    {e.value for t in _external(graph) for e in t.external_data
                     if e.key == "location"})
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True, help="the programs' cache")
    ap.add_argument("--pairs", nargs="*", default=list(PAIRS), help="ENGINE:SCHEME")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="the pairs in turn, this many times "
                    "(each pair's step time: the median of its rounds)")
    ap.add_argument("--lora-layers", default="", help="LoRA on the last N layers only (as "
                    "train): the layers below run once a step, and int8-dynamic rounds "
                    "activations there only")
    ap.add_argument("--out", default="engine_quant.md")
    a = ap.parse_args()
    cache = Path(a.cache)
    where = machine()  # (the load at the start)
    steps: dict[str, list[float]] = {p: [] for p in a.pairs}
    peaks: dict[str, list[float]] = {p: [] for p in a.pairs}
    once: dict[str, list[str]] = {}
    # the pairs in turn, --rounds times: on a shared machine each pair meets the same load
    for rnd in range(a.rounds):
        for pair in a.pairs:
            engine, scheme = pair.split(":")
            kw = dict(trainable="lora", model="smollm2-135m", batch_size=2, seq=64,
                      threads=a.threads, engine=engine, quantize_base=scheme, queries=4,
                      lora_layers=a.lora_layers)
            if engine != "torch":
                kw["program_cache"] = str(cache)
            if rnd == 0:
                t0 = time.perf_counter()
                if engine != "torch":
                    run_mode("prge", **{**kw, "steps": 1, "warmup": 0})  # exports (or finds)
                first = time.perf_counter() - t0
            r = run_mode("prge", **{**kw, "steps": 3, "warmup": 1})
            steps[pair].append(r["step_s_median"])
            peaks[pair].append(r["peak_run_mb"])
            if rnd == 0:
                if engine == "torch":  # the reference: no program
                    once[pair] = ["-", "-", "-", "-"]
                else:
                    path, rec = cached(cache, engine, scheme, bool(a.lora_layers))
                    alone = measure({"engine": engine, "path": str(path), "record": str(rec),
                                     "threads": a.threads, "how": "path (mmap data loader)",
                                     **LOAD.get(engine, {})})
                    once[pair] = [f"{program_bytes(path) / 2**20:.0f}", f"{alone['loaded']:.0f}",
                                  f"{alone['run']:.0f}", f"{first:.0f}"]
            print(rnd, pair, steps[pair][-1], peaks[pair][-1], flush=True)
    ref = statistics.median(steps[a.pairs[0]])
    rows = []
    for pair in a.pairs:
        engine, scheme = pair.split(":")
        med = statistics.median(steps[pair])
        size, loaded, run, first = once[pair]
        rows.append([engine, scheme, size, f"{med:.2f} ({min(steps[pair]):.2f}-"
                     f"{max(steps[pair]):.2f})", f"{ref / med:.2f}x",
                     f"{max(peaks[pair]):.0f}", loaded, run, first])
    end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    layers = f", LoRA on the last {a.lora_layers} layers" if a.lora_layers else ""
    what = ("A quantized base inside the engine programs" if any(
        not p.endswith(":none") for p in a.pairs) else "The engine programs against torch")
    write_table(a.out, f"{what}, default model{layers}",
                "python benchmarks/engine_quant.py " + " ".join(sys.argv[1:]),
                f"{where}; at end: {end}",
                ["engine", "--quantize-base", "program MiB",
                 f"prge q=4 step s, median of {a.rounds} (min-max)",
                 f"speed vs {a.pairs[0].replace(':', ' ')}", "peak RSS in steps MB", "program alone: after load MB",
                 "program alone: after 2 calls MB", "first run (export) wall s"], rows,
                f"""
prge q=4 (FZOO: 5 replicas) at batch 2 x 64, {a.threads} thread(s); each pair's step time is
the median of its rounds' step medians (3 timed steps after 1 untimed, in a fresh process; the
pairs run in turn, round after round), its speed the first pair's median over its own. "Peak
RSS in steps" (the largest of its rounds) is
the workload's (`python -m pocketllm.workload`), whose torch model was loaded in float before
the engine released it (the floor of that column). "Program alone" loads the cached program in
a fresh process with torch imported and calls it twice (benchmarks/engine_memory.py's child,
ONNX Runtime with the engine's session options).
The ONNX program size is the graph and the weights file it names.
""")


if __name__ == "__main__":
    main()
