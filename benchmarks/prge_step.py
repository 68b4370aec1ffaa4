"""P-RGE step time and query throughput: sequential (`--parallel none`) vs batched (`both`).

For the default model with LoRA r=16 on q/v (as in the P-RGE paper), every (per-query batch B,
queries q, parallel mode) configuration runs a few steps in a fresh process (so its peak RSS is
its own). The machine is shared, so configurations are interleaved: each round runs every
configuration once, the none/both pair of a (B, q) back to back, and the table reports medians
over rounds. A step = one prge step (its default estimator) on a B x T batch; queries/s = q / step time.

    python benchmarks/prge_step.py [--rounds 2] [--queries 1 2 4 8] [--batches 1 8] [--seq 64]

A mode `M-unshared` is `--parallel M` with every layer run on every replica, as before
`zo.shared`: with `--lora-layers` (LoRA on the top layers only) it times what running the
frozen layers below once per pass saves. `--one-label` scores one position per row (a
label-word or completion loss) instead of every position.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(a) -> list[dict]:
    """In this process: load, then for each configuration of `a.configs` (B:q:mode, in order)
    set up prge and time `a.steps` steps after `a.warmup`, the peak RSS reset before each."""
    import torch

    from pocketllm.config import TrainArgs
    from pocketllm.models import load_model
    from pocketllm.memory import tune_allocator
    from pocketllm.trainable import setup_trainable

    tune_allocator()  # as `pocketllm train` does
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_model(a.model)
    args = TrainArgs(model=a.model, method="prge", trainable="lora", lora_rank=a.rank,
                     lora_alpha=2.0 * a.rank, learning_rate=1e-3, lora_fa=a.lora_fa,
                     lora_layers=a.lora_layers, lora_targets=a.lora_targets.split(","))
    _, params = setup_trainable(model, args)
    out = []
    for c in a.configs.split(","):
        B, q, mode = c.split(":")
        out.append(time_config(model, params, dataclasses.replace(args, batch_size=int(B)), a,
                               queries=int(q), parallel=mode))
    return out


def time_config(model, params, args, a, **settings) -> dict:
    import torch

    from pocketllm import memory
    from pocketllm.workload import fixed_batch
    from pocketllm.methods import build

    parallel, _, unshared = settings.pop("parallel").partition("-")
    method = build("prge", model, params, args, eps=1e-2, max_replicas=a.max_replicas,
                   parallel=parallel, **settings)
    if unshared:
        method.engine.first = None  # every layer on every replica (no zo.shared)
    # --one-label: one scored position a row, as a label-word or completion loss
    batch = fixed_batch(model.config.vocab_size, args.batch_size, a.seq, masked=a.one_label)
    rss_loaded = memory.rss_mb()
    memory.reset_peak()
    times, cpu = [], []
    for i in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        method.step([batch], i, args.learning_rate)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    # CPU seconds (all threads) as well as wall: on a shared machine the wall time of a step
    # includes waiting for a core, its CPU time much less so
    return {"step_s": statistics.median(times), "times": times,
            "cpu_s": statistics.median(cpu), "rss_loaded_mb": rss_loaded,
            "peak_run_mb": memory.peak_rss_mb(), "passes": len(method.passes),
            "threads": torch.get_num_threads()}


def run_child(a, configs: list[tuple[int, int, str]]) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", "--model", a.model,
           "--configs", ",".join(f"{B}:{q}:{m}" for B, q, m in configs),
           "--seq", str(a.seq), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--rank", str(a.rank), "--threads", str(a.threads),
           "--max-replicas", str(a.max_replicas), "--lora-layers", a.lora_layers,
           "--lora-targets", a.lora_targets] + (["--lora-fa"] if a.lora_fa else []) + (
           ["--one-label"] if a.one_label else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                    help="per-query batch sizes (sequences)")
    ap.add_argument("--modes", nargs="+", default=["none", "both"],
                    help="--parallel modes to compare (the first is the baseline)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-replicas", type=int, default=0)
    ap.add_argument("--lora-fa", action="store_true")
    ap.add_argument("--lora-layers", default="", help="as `train --lora-layers` (empty: all)")
    ap.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated")
    ap.add_argument("--one-label", action="store_true",
                    help="score one position a row (a label loss), not every position")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="prge_step.md", help="results file name")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-process", action="store_true",
                    help="every configuration of a round in one process (model loaded once; "
                         "peak RSS reset before each, so a later one may inherit memory the "
                         "allocator kept): for a machine too busy for a process per config")
    ap.add_argument("--configs", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    from _run import write_table

    from pocketllm.bench.machine import describe
    from pocketllm.zo import noise

    load_start = os.getloadavg()
    t_start = time.time()
    res: dict[tuple, list[dict]] = {}
    for r in range(a.rounds):
        # alternate which mode goes first, so neither always meets the same neighbour
        order = [(B, q, m) for B in a.batches for q in a.queries
                 for m in (a.modes if r % 2 == 0 else a.modes[::-1])]
        groups = [order] if a.in_process else [[c] for c in order]
        for g in groups:
            for (B, q, mode), out in zip(g, run_child(a, g)):
                res.setdefault((B, q, mode), []).append(out)
                print(f"round {r} B={B} q={q} {mode}: {out['step_s']:.3f}s cpu "
                      f"{out['cpu_s']:.3f}s peak {out['peak_run_mb']:.0f}MB "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    load_end = os.getloadavg()
    base = a.modes[0]
    rows = []
    for B in a.batches:
        for q in a.queries:
            for mode in a.modes:
                runs = res[B, q, mode]
                step = statistics.median(x["step_s"] for x in runs)
                # speedup: median over rounds of the per-round ratio to the baseline
                ratio = statistics.median(b["step_s"] / x["step_s"]
                                          for b, x in zip(res[B, q, base], runs))
                cpu = statistics.median(x["cpu_s"] for x in runs)
                cpu_ratio = statistics.median(b["cpu_s"] / x["cpu_s"]
                                              for b, x in zip(res[B, q, base], runs))
                rows.append([B, q, mode, runs[0]["passes"], f"{step:.3f}", f"{q / step:.2f}",
                             f"**{ratio:.2f}x**" if mode != base else "1.00x",
                             f"{cpu:.3f}", f"{q / cpu:.2f}",
                             f"**{cpu_ratio:.2f}x**" if mode != base else "1.00x",
                             f"{max(x['peak_run_mb'] for x in runs):.0f}",
                             f"{runs[0]['rss_loaded_mb']:.0f}"])
    cmd = "python benchmarks/prge_step.py " + " ".join(sys.argv[1:])
    notes = f"""
- step = prge's default estimate (FZOO: q perturbed losses and one unperturbed) over a B x {a.seq}
  batch of random tokens ({'one position a row scored' if a.one_label else 'every position scored'}),
  LoRA r={a.rank} alpha={2 * a.rank} on {a.lora_targets}{f' of layers {a.lora_layers}' if a.lora_layers else ''}{', LoRA-FA' if a.lora_fa else ''}, float32,
  gaussian z (noise backend: {noise.backend()}), sgd update deferred into the next step.
  `none`: a forward of B rows per replica; `both`: one forward of all replicas' rows (P-RGE);
  `-unshared`: every layer on every replica (no `zo.shared`); forwards = passes.
- queries/s = q / step s; speedup = median over rounds of (baseline step s / step s). The CPU
  columns use the process's CPU time (all its threads) instead of wall time: on a shared,
  oversubscribed machine a step's wall time includes waiting for a core, its CPU time much less.
- peak RSS (run): high-water mark from after loading the model and injecting LoRA through the
  {a.warmup} + {a.steps} steps (max over rounds); RSS loaded: resident size before the steps.
- {a.rounds} rounds, {'all configurations of a round in one process (--in-process; peak RSS reset before each configuration)' if a.in_process else 'each configuration a fresh process per round'}
  ({a.warmup} untimed + {a.steps} timed steps, median), configurations interleaved; torch threads
  {a.threads or 'default'}. Total {time.time() - t_start:.0f} s.
- load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f},
  at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}: the {os.cpu_count()} cores are
  shared with other jobs, so absolute times are inflated by contention; the interleaving keeps the
  none/both ratio fair.
"""
    write_table(a.out, f"P-RGE step: sequential vs batched queries ({a.model})", cmd.strip(),
                describe(), ["B", "q", "parallel", "forwards", "step s (wall)", "queries/s",
                             "speedup (wall)", "step CPU s", "queries/CPU s", "speedup (CPU)",
                             "peak RSS (run) MB", "RSS loaded MB"], rows, notes)


if __name__ == "__main__":
    main()
