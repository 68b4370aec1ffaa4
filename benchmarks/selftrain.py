"""A real SST-2 run through the program that trains itself, hosted without torch.

1. `pocketllm export --format onnx --trainable RUN.yaml --steps N`: the default model's whole
   prge step (fzoo, q=8, Rademacher z, the settings of fzoo_sst2.md) as one ONNX program, the
   first N batches of SST-2 k=16 (seed 42), the initial LoRA state.
2. `python examples/host/train_onnx.py BUNDLE RUN`: N steps in a process with no torch and no
   pocketllm (onnxruntime + numpy), writing the ZO log.
3. `pocketllm replay --adapter-path RUN`: the adapter rebuilt in torch from the log alone; the
   largest difference against the program's final state (state.npz).
4. `pocketllm eval --task sst2 --split test`: dev accuracy of the replayed adapter and of the
   base model (zero-shot), on the first --eval-examples dev examples.

    python benchmarks/selftrain.py [--steps 400] [--threads 2] [--eval-examples 500]
    python benchmarks/selftrain.py --quantize-base int4 --steps 20 --eval-examples 0

--quantize-base S: the program's base Linears in S (ONNX Runtime MatMulNBits); --eval-examples
0 skips step 4. The host reports its own peak RSS (VmHWM). Writes selftrain.md (float, with
evaluation), else selftrain_<S or float>_<N>steps.md.

Writes benchmarks/results/selftrain.md (commands, seconds, machine, load at each phase). Needs
/work/shared/data/sst2 (or $POCKETLLM_DATA/sst2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._run import RESULTS  # noqa: E402

RUN = """model: smollm2-135m
task: sst2
k: 16
seed: 42
trainable: lora
lora-rank: 8
lora-alpha: 16
batch-size: {batch}
iters: {steps}
quantize-base: {quantize}
"""
# --method: its settings in RUN.yaml (zo-sgd: MeZO's SPSA on LoRA, the method's task defaults)
METHODS = {"prge": ("method: prge\nestimator: fzoo\nqueries: 8\nperturbation: rademacher\n"
                    "eps: 1.0e-3\nlearning-rate: 1.0e-2\n",
                    "prge (fzoo, q=8, Rademacher z, eps 1e-3, lr 1e-2 constant): the settings "
                    "of fzoo_sst2.md"),
           "zo-sgd": ("method: zo-sgd\n", "zo-sgd (SPSA, Gaussian z, the method's task "
                                          "defaults): ZO-LoRA, one +/- pair of forwards")}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu})"


def timed(cmd: list[str], phases: list, what: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0, at = time.time(), load()
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{what} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                         f"{p.stderr[-3000:]}")
    phases.append((what, " ".join(cmd), time.time() - t0, at, load()))
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--work", default="/tmp/pocketllm-selftrain", help="bundle, run, adapter")
    ap.add_argument("--quantize-base", default="none", help="the program's base: none, int8, "
                    "int4 (MatMulNBits), int8-dynamic (MatMulInteger)")
    ap.add_argument("--method", default="prge", choices=list(METHODS))
    ap.add_argument("--batch-size", type=int, default=2)
    a = ap.parse_args()
    for flag, value, default in (("", a.quantize_base, "none"), ("", a.method, "prge"),
                                 ("b", a.batch_size, 2)):
        if value != default:
            a.work += f"-{flag}{value}"  # (a bundle of its own)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg, bundle, run, adapter = (work / "run.yaml", work / "bundle", work / "run",
                                 work / "replayed")
    cfg.write_text(RUN.format(steps=a.steps, quantize=a.quantize_base, batch=a.batch_size)
                   + METHODS[a.method][0])
    py = sys.executable
    cli = [py, "-m", "pocketllm.cli"]
    phases: list = []
    if not (bundle / "manifest.json").is_file() or \
            json.loads((bundle / "manifest.json").read_text())["steps"] < a.steps or \
            json.loads((bundle / "manifest.json").read_text()).get(
                "quantize_base", "none") != a.quantize_base:
        timed([*cli, "export", "--format", "onnx", "--trainable", str(cfg), "--steps",
               str(a.steps), "--out", str(bundle)], phases,
              "export")
    timed([py, "examples/host/train_onnx.py", str(bundle), str(run), "--steps", str(a.steps),
           "--threads", str(a.threads)], phases, "host (onnxruntime, no torch)")
    host = json.loads((run / "host.json").read_text())
    timed([*cli, "replay", "--adapter-path", str(run), "--save-path", str(adapter)], phases,
          "replay (torch)")
    gap = diff(run, adapter)
    evals = {}
    for name, extra in (("replayed adapter", ["--adapter-path", str(adapter)]),
                        ("base (zero-shot)", [])) if a.eval_examples else ():
        out = work / f"eval-{name.split()[0]}.json"
        timed([*cli, "eval", "--model", "smollm2-135m", "--task", "sst2", "--split", "test",
               "--eval-examples", str(a.eval_examples), "--batch-size", "32", "--threads",
               str(a.threads), "--json-out", str(out), *extra], phases, f"eval: {name}")
        evals[name] = json.loads(out.read_text())
    write(a, phases, host, gap, evals, json.loads((bundle / "manifest.json").read_text()))
    return 0


def diff(run: Path, adapter: Path) -> dict:
    """The largest |replayed - program| over the adapter's tensors, and whether bit-equal."""
    import numpy as np
    import torch

    from pocketllm.models import load_model
    from pocketllm.trainable import load_saved
    from pocketllm.zo.log import ZOLog
    head, _ = ZOLog(run).read()
    model, _ = load_model("smollm2-135m")
    load_saved(model, str(adapter))
    named = dict(model.named_parameters())
    got = torch.cat([named[p].detach().reshape(-1) for p in head["params"]])
    final = torch.from_numpy(np.load(run / "state.npz")["train"])
    return {"max_abs": float((got - final).abs().max()), "equal": bool(torch.equal(got, final)),
            "elements": int(final.numel())}


def write(a, phases, host, gap, evals, manifest) -> None:
    times = sorted(host["step_seconds"])
    acc = {k: v.get("accuracy") for k, v in evals.items()}
    quant = "" if a.quantize_base == "none" else f" --quantize-base {a.quantize_base}"
    quant += "" if a.method == "prge" else f" --method {a.method}"
    quant += "" if a.batch_size == 2 else f" --batch-size {a.batch_size}"
    base = ("float32" if a.quantize_base == "none" else
            f"{a.quantize_base} (the base Linears as ONNX Runtime "
            f"{'MatMulInteger' if a.quantize_base == 'int8-dynamic' else 'MatMulNBits'})")
    peak = host.get("peak_rss_mb")
    lines = [
        "# A program that trains itself: SST-2 through the torch-free ONNX host", "",
        f"Command: `python benchmarks/selftrain.py --steps {a.steps} --threads {a.threads} "
        f"--eval-examples {a.eval_examples}{quant}`  ",
        f"Machine: {machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        f"Run: smollm2-135m, SST-2 k=16 seed 42, LoRA r=8 (q, v), batch {a.batch_size}, "
        f"{METHODS[a.method][1]}.", "",
        "| what | figure |", "|---|---|",
        f"| steps run by the host | {host['steps']} |",
        f"| host imported torch | {host['torch_imported']} |",
        f"| loss (mean of the replicas), first 10 / last 10 steps | "
        f"{sum(host['losses'][:10]) / 10:.4f} / {sum(host['losses'][-10:]) / 10:.4f} |",
        f"| step time, median (ONNX Runtime, {a.threads} threads) | "
        f"{times[len(times) // 2]:.3f} s |",
        f"| replayed adapter vs the program's final state: max abs diff | {gap['max_abs']:.1e} "
        f"({'bit for bit equal' if gap['equal'] else 'not bit-equal'}, {gap['elements']} "
        "values) |",
        f"| program (graph + weights file), base {base} | "
        f"{manifest['program_bytes'] / 2**20:.0f} MiB |",
        f"| host's peak RSS (VmHWM: python, numpy, the runtime, the program) | "
        f"{'-' if peak is None else f'{peak:.0f} MB'} |"]
    if evals:
        lines += [
            f"| dev accuracy, replayed adapter ({a.eval_examples} dev examples) | "
            f"{100 * acc['replayed adapter']:.1f}% |",
            f"| dev accuracy, base model (zero-shot) | {100 * acc['base (zero-shot)']:.1f}% |"]
    lines += [
        "", "Phases (wall seconds; load average before / after):", "",
        "| phase | s | load before | load after | command |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {s:.0f} | {b.split('load average:')[-1].strip()} | "
              f"{e.split('load average:')[-1].strip()} | `{c}` |" for w, c, s, b, e in phases]
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = ("selftrain.md" if a.quantize_base == "none" and evals else  # (the full run's)
            f"selftrain_{a.quantize_base.replace('none', 'float')}"
            f"{'' if a.method == 'prge' else '_' + a.method}"
            f"{'' if a.batch_size == 2 else f'_b{a.batch_size}'}_{a.steps}steps.md")
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
