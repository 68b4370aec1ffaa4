"""The inference engines (`--engine onnxruntime|executorch`) against torch: equal losses, a loss
curve that tracks torch's, and step time and peak RSS side by side.

1. Equivalence, default model (smollm2-135m, LoRA r=8 on q/v, B shifted by 0.01 so A's
   perturbation shows): the 8 perturbed losses of a prge q=4 step (spsa, one pass) on two
   SST-2 training examples, per engine, against the torch engine's; the export time of each
   engine's program (a fresh cache).
2. A 20-step `pocketllm train --method prge --queries 4` run of tiny-llama per engine (same
   seed): the largest relative gap between each engine's logged step losses and torch's.
3. Speed and memory, default model: `python -m pocketllm.workload` (a fresh process per run, so
   its peak RSS is its own) for zo-sgd (LoRA) and prge q=4 (fzoo: 5 replicas) at batch 2 x 64
   tokens (the phone batch: per-query batch 2), every position scored (the workload's dense
   language-modelling loss), per engine; an engine's program is exported by a first run (its
   wall time reported) and the measured run loads it from the cache. Runs of one method are
   back to back, so their ratio is measured under the same load.

    python benchmarks/engines.py [--threads 2] [--steps 3] [--skip 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._run import RESULTS, run_mode  # noqa: E402

ENGINES = ("torch", "onnxruntime", "executorch")
DEFAULT = "smollm2-135m"


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} cores ({cpu}); at start: {load}"


def equivalence(cache: Path, threads: int) -> list[list]:
    import torch

    from pocketllm.config import TrainArgs
    from pocketllm.data.tasks import TASKS, Example, encode_examples
    from pocketllm.engines import REGISTRY
    from pocketllm.models import load_model
    from pocketllm.objectives import choose
    from pocketllm.trainable import setup_trainable
    from pocketllm.zo import noise
    from pocketllm.zo.plan import Plan, Replica, group_passes

    torch.set_num_threads(threads)
    model, tok = load_model(DEFAULT)
    _, params = setup_trainable(model, TrainArgs(model=DEFAULT, trainable="lora", seed=0))
    with torch.no_grad():
        for n, p in params:
            p.requires_grad_(False)
            if n.endswith(".lora_B"):
                p.add_(0.01)
    lines = (Path("/work/shared/data/sst2/train.tsv").read_text().splitlines()[1:3]
             if Path("/work/shared/data/sst2/train.tsv").exists() else
             ["a gripping , funny film\t1", "dull and tedious\t0"])
    exs = [Example({"sentence": l.split("\t")[0]}, int(l.split("\t")[1])) for l in lines]
    items = encode_examples(exs, TASKS["sst2"], tok, False, 64)
    objective = choose(items)
    batch = objective.collate(items, tok.pad_token_id)
    q = 4
    replicas = [Replica(j, s) for j in range(q) for s in (1.0, -1.0)]
    keys = [[noise.derive_key(1, j, i) for i in range(len(params))] for j in range(q)]
    plan = Plan(keys, 1e-3, replicas, group_passes(replicas, "both"))
    rows, ref = [], None
    for name in ENGINES:
        kw = {} if name == "torch" else {"program_cache": str(cache)}
        for dist in ("rademacher", "gaussian"):
            engine = REGISTRY[name](model, params, objective.stats, dist=dist, **kw)
            t0 = time.perf_counter()
            got = engine.losses(batch, plan)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = engine.losses(batch, plan)
            again = time.perf_counter() - t0
            if name == "torch":
                ref = ref or {}
                ref[dist] = got
            rel = float(((got - ref[dist]).abs() / ref[dist].abs()).max())
            rows.append([name, dist, f"{rel:.1e}", f"{getattr(engine, 'export_seconds', 0):.0f}",
                         f"{first:.2f}", f"{again:.3f}"])
            print(rows[-1], flush=True)
    return rows


def tiny_run(tmp: Path) -> tuple[list[list], dict]:
    logs = {}
    for name in ENGINES:
        out = tmp / f"tiny-{name}"
        cmd = [sys.executable, "-m", "pocketllm.cli", "train", "--model", "tiny-llama",
               "--data", str(ROOT / "examples" / "personal"), "--batch-size", "2",
               "--max-seq-length", "128", "--iters", "20", "--steps-per-eval", "0",
               "--no-eval-before", "--save-every", "0", "--method", "prge", "--queries", "4",
               "--seed", "1", "--engine", name, "--program-cache", str(tmp / "programs"),
               "--adapter-path", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        records = [json.loads(line) for line in (out / "zo_log.jsonl").open()][1:]  # header first
        logs[name] = [r["loss"] for r in records]
    rows = []
    for name in ENGINES:
        gap = max(abs(a - b) / abs(b) for a, b in zip(logs[name], logs["torch"]))
        rows.append([name, len(logs[name]), f"{logs[name][0]:.5f}", f"{logs[name][-1]:.5f}",
                     f"{gap:.1e}"])
    return rows, logs


def speed(cache: Path, threads: int, steps: int) -> list[list]:
    rows = []
    for method, extra in (("zo-sgd", {}), ("prge", {"queries": 4})):
        base = None
        for name in ENGINES:
            kw = dict(trainable="lora", model=DEFAULT, batch_size=2, seq=64, steps=steps,
                      warmup=1, threads=threads, engine=name, **extra)
            fill = ""
            if name != "torch":
                kw["program_cache"] = str(cache)
                t0 = time.perf_counter()
                run_mode(method, **{**kw, "steps": 1, "warmup": 0})  # exports into the cache
                fill = f"{time.perf_counter() - t0:.0f}"
            r = run_mode(method, **kw)
            step, peak = r["step_s_median"], max(r["peak_run_mb"], r["peak_load_mb"])
            base = base or (step, peak)
            rows.append([method, name, f"{step:.3f}", f"{base[0] / step:.2f}x",
                         f"{r['peak_run_mb']:.0f}", f"{peak:.0f}", f"{peak / base[1]:.2f}",
                         fill])
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip", type=int, nargs="*", default=[])
    ap.add_argument("--cache", default="", help="the programs' cache (default: a fresh one, "
                    "so that the export times are measured)")
    a = ap.parse_args()
    command = "python benchmarks/engines.py " + " ".join(sys.argv[1:])
    where = machine()
    tmp = Path(tempfile.mkdtemp(prefix="pocketllm-engines-"))
    cache = Path(a.cache) if a.cache else tmp / "programs"
    parts = []
    if 1 not in a.skip:
        rows = equivalence(cache, a.threads)
        parts.append(("1. Equivalence, default model: a prge q=4 step's 8 perturbed losses "
                      "(eps 1e-3) on two SST-2 examples",
                      ["engine", "noise", "max rel. gap to torch", "export s",
                       "first call s (export + load)", "call s"], rows))
    if 2 not in a.skip:
        rows, _ = tiny_run(tmp)
        parts.append(("2. tiny-llama, 20 prge q=4 steps, seed 1: logged step losses",
                      ["engine", "steps", "loss at step 0", "loss at step 19",
                       "max rel. gap to torch"], rows))
    if 3 not in a.skip:
        rows = speed(cache, a.threads, a.steps)
        parts.append((f"3. Step time and peak RSS, default model, batch 2 x 64, {a.threads} "
                      f"threads (median of {a.steps} steps after 1 warm-up)",
                      ["method", "engine", "step s", "speedup vs torch", "peak RSS in steps MB",
                       "peak RSS MB", "RSS vs torch", "export run wall s"], rows))
    end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    stamp = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    blocks = previous_blocks()  # a section skipped now keeps its last measurement
    for title, header, rows in parts:
        block = [f"## {title}", "", f"Command: `{command}`  ",
                 f"Machine: {where}; at end: {end}  ", f"Date: {stamp}", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        block += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        blocks[title.split(".")[0]] = "\n".join(block) + "\n"
    lines = ["# Inference engines against torch", "", *(blocks[k] for k in sorted(blocks)),
             NOTES]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engines.md").write_text("\n".join(lines).strip() + "\n")
    print("\n".join(lines))


def previous_blocks() -> dict[str, str]:
    """The sections ("## N. ...") of the last engines.md, by number."""
    path = RESULTS / "engines.md"
    if not path.exists():
        return {}
    text = path.read_text().split("\nNotes.")[0]
    return {b.split(".")[0]: "## " + b.rstrip() + "\n" for b in text.split("\n## ")[1:]}


NOTES = """
Notes. Each engine runs pocketllm's own step program (pocketllm/engines/program.py): LoRA of
every replica as inputs through bmm, zo/noise.py's hash generated inside in int64 ops, the label
words' / streamed head loss. 'export s' is the lowering time of one program (the cache then
serves it). The machine is shared with other agents' jobs: compare rows measured back to back
(the ratios), not absolute times across tables. Section 3's peak RSS is the whole workload
process: an engine run loads the torch model (the load's peak counts), then releases its frozen
weights before the program loads (`Engine.release_model`), so the weights are held once.
"""


if __name__ == "__main__":
    main()
