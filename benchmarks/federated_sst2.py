"""SST-2 with 10 simulated devices, non-IID, beside pooled zeroth-order training on the union.

Federated: `pocketllm federate simulate` with 10 devices, the k-per-class few-shot sample of
SST-2 (--k 80: 160 examples) split by Dirichlet(0.5) over the labels (about 16 a device),
prge with 16 queries, each device a batch of 2 a round. Pooled: `pocketllm train` on the same
160 examples, same method and settings, a batch of 20 (the ten devices' batches together), for
as many steps as rounds: the same forward passes over the same number of rows.

The federated run's dev accuracy against rounds comes from its log: the base model plus the log's
first r rounds are the shared model after round r (replayed here at each --eval-every), scored
on the same dev examples as the pooled run's --test-every evaluations. Needs
/work/shared/data/sst2 (or $POCKETLLM_DATA/sst2).

    python benchmarks/federated_sst2.py [--rounds 40] [--eval-every 10] [--eval-examples 300]
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from federated import RESULTS, load, machine  # noqa: E402


def cli(*argv: str, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "pocketllm.cli", *argv], stdout=f,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}
                            ).returncode
    if rc:
        raise SystemExit(f"{' '.join(argv[:2])} failed ({rc}): see {log}")
    return time.perf_counter() - t0


def fed_curve(out: Path, common: list[str], every: int, rounds: int) -> list[tuple[int, float]]:
    """(round, dev accuracy) of the shared model after each `every` rounds, replayed from the
    base model and the log."""
    from pocketllm.config import FederateArgs
    from pocketllm.evaluate import evaluate
    from pocketllm.federated import build
    from pocketllm.federated.log import read
    _, records = read(out)
    args = FederateArgs(**_flags_to_kw(common), adapter_path=str(out))
    sh = build.load(args, {"queries": 16})
    dev, points = sh.device, []
    for r in range(0, rounds + 1, every):
        dev.catch_up(dev.have, records[dev.have:r])
        res = evaluate(dev.method.model, sh.enc["test"].items, 16, sh.tok.pad_token_id, -1,
                       objective=dev.method.objective)
        points.append((r, res.accuracy))
        print(f"federated round {r}: dev accuracy {res.accuracy:.1%}", flush=True)
    return points


def _flags_to_kw(flags: list[str]) -> dict:
    kw, i = {}, 0
    while i < len(flags):
        key = flags[i][2:].replace("-", "_")
        val = flags[i + 1]
        kw[key] = int(val) if val.isdigit() else val
        i += 2
    return kw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-examples", type=int, default=300)
    ap.add_argument("--out", default="runs/federated_sst2")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), load()
    # what both runs share (the data sample, model, method)
    common = ["--task", "sst2", "--k", "80", "--eval-examples", str(a.eval_examples),
              "--model", "smollm2-135m", "--max-seq-length", "64", "--seed", "42",
              "--threads", "1"]
    fed_dir, pooled_dir = out / "federated", out / "pooled"
    fed_s = cli("federate", "simulate", *common, "--method", "prge", "--queries", "16",
                "--clients", "10", "--partition", "dirichlet:0.5", "--batch-size", "2",
                "--iters", str(a.rounds), "--adapter-path", str(fed_dir),
                log=out / "federated.log")
    summary = json.loads((fed_dir / "fed_summary.json").read_text())
    pooled_s = cli("train", *common, "--method", "prge", "--queries", "16", "--batch-size",
                   "20", "--iters", str(a.rounds), "--test-every", str(a.eval_every),
                   "--steps-per-eval", "0", "--no-keep-best", "--save-every", "0",
                   "--adapter-path", str(pooled_dir), log=out / "pooled.log")
    fed = fed_curve(fed_dir, common, a.eval_every, a.rounds)
    pooled = {0: None}
    for line in (pooled_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("test_accuracy") is not None:
            pooled[int(m["step"])] = (float(m["test_accuracy"]), float(m.get("wall", 0.0)))
    ps = json.loads((pooled_dir / "summary.json").read_text())
    fed_wall = [sum(summary["round_seconds"][:r]) for r in range(a.rounds + 1)]
    rows = []
    for r, acc in fed:
        p = pooled.get(r) or (None, None)
        if r == 0:
            p = ((ps["before"] or {}).get("accuracy"), 0.0)
        if r == a.rounds:
            p = ((ps["after"] or {}).get("accuracy"), ps["train_seconds"])
        rows.append(f"| {r} | {acc:.1%} | {fed_wall[r]:.0f} | "
                    + (f"{p[0]:.1%} | {p[1]:.0f} |" if p[0] is not None else "- | - |"))
    gap = (fed[-1][1] - (ps["after"] or {}).get("accuracy", float("nan"))) * 100
    lines = ["# SST-2, 10 simulated devices (non-IID) beside pooled zeroth-order training", "",
             f"Command: `python benchmarks/federated_sst2.py --rounds {a.rounds} --eval-every "
             f"{a.eval_every} --eval-examples {a.eval_examples}`  ",
             f"Machine: {machine()}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
             f"{load0} at start, {load()} at the end (other jobs on the machine); "
             f"{time.time() - t0:.0f} s in all (federated {fed_s:.0f} s, pooled {pooled_s:.0f} s "
             "with their evaluations)", "",
             "smollm2-135m, LoRA r=8 q/v, prge (FZOO estimate) with 16 queries, its default "
             "lr 1e-2; SST-2 k=80 per class (160 examples, seed 42); dev accuracy on the first "
             f"{a.eval_examples} dev examples. Federated: 10 devices, Dirichlet(0.5) over the "
             "labels, batch 2 each, mean aggregation; pooled: one run on all 160, batch 20, "
             "one step per round (the same forward passes over as many rows).", "",
             "| round / step | federated dev acc | federated s (rounds only) | pooled dev acc | "
             "pooled s (steps only) |", "|---|---|---|---|---|", *rows, "",
             f"Federated minus pooled after {a.rounds} rounds: {gap:+.1f} points (target: within "
             f"2 points). Devices agreeing at the end: {summary['agree']}/10. "
             "FedAvg of LoRA deltas on the same split was not run (not built here)."]
    (RESULTS / "federated_sst2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
