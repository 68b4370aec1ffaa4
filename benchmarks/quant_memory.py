"""Peak RSS of ZO-LoRA (zo-sgd) with a float and a quantized frozen base (--quantize-base), each
run in a fresh process (pocketllm.workload: load, one unmeasured step, then the measured ones).

    python benchmarks/quant_memory.py [--batch-size 8] [--seq 64] [--steps 1]

Rows are kept in benchmarks/results/quant_memory.jsonl as they are measured (a row there is
not run again), so an interrupted run continues.

Models: the default model (smollm2-135m, its pretrained weights) and random:opt-1.3b (OPT-1.3B's
published config with random weights, no download). Both are quantized layer by layer as they
are read or filled (`models/stream.py`): the load peak is the quantized model's plus one layer.
Both peaks are reported: "peak" is the larger.
Writes benchmarks/results/quant_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pathlib import Path

from _run import RESULTS, run_mode, write_table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pocketllm.bench.machine import describe  # noqa: E402

RUNS = [  # (model, dtype, --quantize-base, batch size: 0 = --batch-size)
    ("smollm2-135m", "float32", "none", 0),
    ("smollm2-135m", "bfloat16", "none", 0),
    ("smollm2-135m", "float32", "int8", 0),
    ("smollm2-135m", "float32", "int4", 0),
    ("smollm2-135m", "bfloat16", "int4", 0),
    ("smollm2-135m", "bfloat16", "int4", 1),
    ("random:opt-1.3b", "float32", "none", 0),
    ("random:opt-1.3b", "bfloat16", "none", 0),
    ("random:opt-1.3b", "float32", "int8", 0),
    ("random:opt-1.3b", "float32", "int4", 0),
    ("random:opt-1.3b", "bfloat16", "int4", 0),
    ("random:opt-1.3b", "bfloat16", "int4", 1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="run only the models containing this text")
    ap.add_argument("--rows", default=str(RESULTS / "quant_memory.jsonl"),
                    help="each measured row is kept here; a row already in it is not run again "
                         "(delete its line to measure it again)")
    a = ap.parse_args()
    rows_file = Path(a.rows)
    done = {}
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["dtype"], r["quantize_base"], r["batch"], r["seq"])] = r
    rows = []
    for model, dtype, quant, batch in RUNS:
        if a.only and a.only not in model:
            continue
        batch = batch or a.batch_size
        key = (model, dtype, quant, batch, a.seq)
        if key not in done:
            t0, load = time.time(), os.getloadavg()[0]
            r = run_mode("zo-sgd", trainable="lora", model=model, dtype=dtype,
                         batch_size=batch, seq=a.seq, steps=a.steps, warmup=1,
                         threads=a.threads, quantize_base=quant)
            r.update(wall_s=time.time() - t0, load=load,
                     when=time.strftime("%H:%M", time.gmtime()))
            with rows_file.open("a") as f:
                f.write(json.dumps(r) + "\n")
            done[key] = r
        r = done[key]
        peak = max(r["peak_load_mb"], r["peak_run_mb"])
        rows.append([model, dtype, quant, f"{batch} x {a.seq}", f"{r['peak_load_mb']:.0f}",
                     f"{r['rss_loaded_mb']:.0f}", f"{r['peak_run_mb']:.0f}", f"**{peak:.0f}**",
                     f"{r['step_s_median']:.1f}", f"{r['load']:.1f} at {r['when']}"])
        print(rows[-1], flush=True)
    cmd = "python benchmarks/quant_memory.py " + " ".join(sys.argv[1:])
    notes = f"""
zo-sgd, --trainable lora (rank 8 on q_proj/v_proj, float32 adapter), {a.threads} threads,
{a.steps} measured step(s) after one unmeasured, each row in a fresh process
(`python -m pocketllm.workload --method zo-sgd --trainable lora --quantize-base S ...`).
Peak load: VmHWM once the model is loaded (and quantized); loaded: RSS then; peak run: VmHWM
over the steps (reset after loading); peak: the larger. int8: torchao Int8WeightOnlyConfig;
int4: 4-bit packed, groups of 128 (64 where the width needs it), aten's CPU int4 kernel; with
either, the embedding table (tied: the output head, stored once) in int8 rows with a float32
scale each (pocketllm/quantize.py). Float in every scheme: norms, position embeddings, the
adapter. Quantized loads are streamed: each Linear quantized as it is read, the table 1024 rows
at a time from the file (smollm2-135m: its cached safetensors) or the seeded pool (random:
shapes), so no float copy of the model, nor of the table, is ever resident. smollm2-135m in
float32 (`none`) keeps its weights in the file's mapping, which count as they are touched
(hence "loaded" below the peak). What every row carries besides the model (measured, fresh
processes, benchmarks/results/quant_memory_stages.md): python + torch 219 MB; + pocketllm and
transformers' Llama modeling 341 MB (388 when transformers also imports torchao and scipy,
which pocketllm/lean_import.py now keeps it from); + the tokenizer (loaded with the model)
390 MB. The two random:opt-1.3b `none` rows are
from an earlier run (20:38, the date in the load column), before the lean import: ~47 MB of
each would go now. Step times are NOT comparable across rows: the
machine was shared with other jobs (the load column: the 1-minute load average when the row
started, 2 cores).
"""
    write_table("quant_memory.md", "ZO-LoRA peak RSS with a quantized frozen base", cmd,
                describe(), ["model", "dtype", "--quantize-base", "batch", "peak load MB",
                             "loaded MB", "peak run MB", "peak MB", "step s", "load"],
                rows, notes)


if __name__ == "__main__":
    main()
