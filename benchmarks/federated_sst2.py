"""SST-2 with 10 simulated devices, non-IID, beside pooled zeroth-order training on the union
and beside FedAvg of LoRA deltas.

Federated: `pocketllm federate simulate` with 10 devices, the k-per-class few-shot sample of
SST-2 (--k 80: 160 examples) split by Dirichlet(0.5) over the labels (about 16 a device),
prge with 16 queries, each device a batch of 2 a round. Pooled: `pocketllm train` on the same
160 examples, same method and settings, a batch of 20 (the ten devices' batches together), for
as many steps as rounds: the same forward passes over the same number of rows.

The federated run's dev accuracy against rounds comes from its log: the base model plus the log's
first r rounds are the shared model after round r (replayed here at each --eval-every), scored
on the same dev examples as the pooled run's --test-every evaluations. Needs
/work/shared/data/sst2 (or $POCKETLLM_DATA/sst2).

FedAvg of LoRA deltas (benchmarks/fedavg_lora.py): the same 10-device split, each device a
few lora-adam steps of batch 2 a round from the global adapter, averaged by examples.

Each arm (--arms, comma-separated: federated, pooled, fedavg) saves its curve to
OUT/<arm>.json, so the arms can run one at a time (in separate invocations); the table in
benchmarks/results/federated_sst2.md is written from every arm saved in OUT.

    python benchmarks/federated_sst2.py [--rounds 40] [--eval-every 10] [--eval-examples 300]
        [--arms federated,pooled,fedavg] [--aggregate pooled] [--local-steps 4] [--report-only]
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


def run_federated(a, out: Path, common: list[str]) -> dict:
    fed_dir = out / "federated"
    secs = cli("federate", "simulate", *common, "--method", "prge", "--queries", "16",
               "--clients", "10", "--partition", "dirichlet:0.5", "--batch-size", "2",
               "--aggregate", a.aggregate, "--iters", str(a.rounds),
               "--adapter-path", str(fed_dir), log=out / "federated.log")
    summary = json.loads((fed_dir / "fed_summary.json").read_text())
    wall = [sum(summary["round_seconds"][:r]) for r in range(a.rounds + 1)]
    curve = [(r, acc, wall[r]) for r, acc in fed_curve(fed_dir, common, a.eval_every, a.rounds)]
    return {"curve": curve, "seconds": secs, "aggregate": a.aggregate,
            "note": f"--aggregate {a.aggregate}; devices agreeing at the end: "
                    f"{summary['agree']}/10."}


def run_pooled(a, out: Path, common: list[str]) -> dict:
    pooled_dir = out / "pooled"
    # --max-replicas 2: forwards of 2 replicas x 20 rows, about a device's 17 x 2 (one forward
    # of all 17 x 20 rows is the same losses, nearly twice as slow on this CPU)
    secs = cli("train", *common, "--method", "prge", "--queries", "16", "--batch-size",
               "20", "--max-replicas", "2", "--iters", str(a.rounds), "--test-every",
               str(a.eval_every),
               "--steps-per-eval", "0", "--no-keep-best", "--save-every", "0",
               "--adapter-path", str(pooled_dir), log=out / "pooled.log")
    ps = json.loads((pooled_dir / "summary.json").read_text())
    curve = [(0, (ps["before"] or {}).get("accuracy"), 0.0)]
    for line in (pooled_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("test_accuracy") is not None and 0 < int(m["step"]) < a.rounds:
            curve.append((int(m["step"]), float(m["test_accuracy"]), float(m.get("wall", 0.0))))
    curve.append((a.rounds, (ps["after"] or {}).get("accuracy"), ps["train_seconds"]))
    return {"curve": curve, "seconds": secs, "note": ""}


def run_fedavg(a, out: Path, common: list[str]) -> dict:
    import fedavg_lora

    from pocketllm.config import FederateArgs
    args = FederateArgs(**_flags_to_kw(common), method="lora-adam", clients=10,
                        partition="dirichlet:0.5", batch_size=2, learning_rate=a.fedavg_lr,
                        adapter_path=str(out / "fedavg"))
    t0 = time.perf_counter()

    def note(curve):  # what a stopped run leaves (--stop-at reads it); the lr run resolved
        (out / "fedavg_partial.json").write_text(json.dumps(
            {"curve": curve, "t0": time.time() - (time.perf_counter() - t0),
             "lr": args.learning_rate}))
    curve = fedavg_lora.run(args, a.rounds, a.local_steps, a.eval_every, on_point=note)
    return {"curve": curve, "seconds": time.perf_counter() - t0,
            "note": fedavg_note(args.learning_rate, a.local_steps)}


def fedavg_note(lr: float, local_steps: int) -> str:
    return (f"lora-adam, lr {lr:g}, {local_steps} local steps of batch 2 a device a round, a "
            "fresh AdamW each round, adapters averaged weighted by the devices' examples "
            "(benchmarks/fedavg_lora.py); seconds are training (evaluations excluded).")


ARMS = {"federated": run_federated, "pooled": run_pooled, "fedavg": run_fedavg}


# ---- --stop-at N: an arm stopped (killed) after round N, its curve read from what it left ----
def stopped_pooled(a, out: Path, common: list[str]) -> dict:
    """From the pooled run's metrics.jsonl: its --test-every evaluations up to step N (with
    the training seconds it logs)."""
    curve = []
    for line in (out / "pooled" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("test_accuracy") is not None and int(m["step"]) <= a.stop_at:
            curve.append((int(m["step"]), float(m["test_accuracy"]), float(m.get("wall", 0))))
    if curve[-1][0] != a.stop_at:
        raise SystemExit(f"--stop-at {a.stop_at}: the pooled run has no evaluation there")
    start = out / "pooled_start.txt"  # (written by hand when it started; else unknown)
    return {"curve": curve, "seconds": curve[-1][2],
            **({"t0": float(start.read_text())} if start.exists() else {}),
            "note": f"Stopped after step {a.stop_at} of --rounds {a.rounds} (the session's "
                    "deadline); seconds are its steps (evaluations excluded)."}


def stopped_federated(a, out: Path, common: list[str]) -> dict:
    """The log's first N rounds replayed; a round's wall-clock from OUT/fed_watch.txt (the
    log's line count sampled every 5 s: the first sample holding the round) since the
    simulate process started (OUT/fed_start.txt: Ray's and the model's start included)."""
    start = float((out / "fed_start.txt").read_text())
    seen = [tuple(map(float, ln.split())) for ln in (out / "fed_watch.txt").read_text()
            .splitlines() if len(ln.split()) == 2]

    def wall(r):  # round r-1 done: the header and r records
        return next((t - start for t, n in seen if n >= r + 1), float("nan")) if r else 0.0
    curve = [(r, acc, wall(r)) for r, acc in
             fed_curve(out / "federated", common, a.eval_every, a.stop_at)]
    return {"curve": curve, "seconds": curve[-1][2], "aggregate": a.aggregate, "t0": start,
            "note": f"--aggregate {a.aggregate}. Stopped after round {a.stop_at} of --rounds "
                    f"{a.rounds} (the session's deadline); seconds from the simulate process's "
                    "start (Ray's and the model's start included) to the round's record in "
                    "the log (sampled every 5 s)."}


def stopped_fedavg(a, out: Path, common: list[str]) -> dict:
    """The evaluations the FedAvg run saved as it went (OUT/fedavg_partial.json), to round N."""
    got = json.loads((out / "fedavg_partial.json").read_text())
    curve = [p for p in got["curve"] if p[0] <= a.stop_at]
    if curve[-1][0] != a.stop_at:
        raise SystemExit(f"--stop-at {a.stop_at}: the fedavg run has no evaluation there")
    return {"curve": curve, "seconds": curve[-1][2], "t0": got["t0"],
            "note": f"Stopped after round {a.stop_at} of --rounds {a.rounds} (the session's "
                    "deadline). " + fedavg_note(got["lr"], a.local_steps)}


STOPPED = {"federated": stopped_federated, "pooled": stopped_pooled, "fedavg": stopped_fedavg}


def sampled_load(out: Path) -> str:
    """The 1-minute load averages OUT/load.txt sampled each minute while the arms ran."""
    path = out / "load.txt"
    vals = [float(ln.split()[1]) for ln in path.read_text().splitlines()] if path.exists() else []
    return (f"{min(vals):.1f} to {max(vals):.1f} (1-minute load average sampled each minute "
            f"while the arms ran, median {sorted(vals)[len(vals) // 2]:.1f})" if vals else "?")
TITLES = {"federated": "federated ZO", "pooled": "pooled ZO", "fedavg": "FedAvg LoRA"}


def report(a, out: Path) -> None:
    res = {arm: json.loads((out / f"{arm}.json").read_text())
           for arm in TITLES if (out / f"{arm}.json").exists()}
    if not res:
        raise SystemExit(f"no arm saved in {out}: run with --arms first")
    steps = sorted({int(p[0]) for r in res.values() for p in r["curve"]})
    at = {arm: {int(p[0]): p for p in r["curve"]} for arm, r in res.items()}
    head = " | ".join(f"{TITLES[arm]} dev acc | {TITLES[arm]} s" for arm in res)
    rows = []
    for s in steps:
        cells = []
        for arm in res:
            p = at[arm].get(s)
            cells.append(f"{p[1]:.1%} | {p[2]:.0f}" if p and p[1] is not None else "- | -")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    def load_of(r):  # a stopped arm's start / end load are those of reading it back
        ends = ("" if r.get("stopped") else f"{r['load_start']} at start, {r['load_end']} at "
                "the end, ")
        return f"load average {ends}{r.get('load_during', '?')}"
    runs = "\n".join(f"- {TITLES[arm]}: `{r['command']}` on {r['machine']}, started "
                     f"{r['date']}, {load_of(r)}; {r['seconds']:.0f} s. {r['note']}".rstrip()
                     for arm, r in res.items())
    lines = ["# SST-2, 10 simulated devices (non-IID) beside pooled zeroth-order training "
             "and FedAvg of LoRA deltas", "",
             "smollm2-135m, LoRA r=8 q/v, SST-2 k=80 per class (160 examples, seed 42); dev "
             "accuracy on the first N dev examples (the command's --eval-examples). Federated: "
             "10 devices, Dirichlet(0.5) over the labels, prge (FZOO estimate) with 16 queries, "
             "its default lr 1e-2, batch 2 each; pooled: one run on all 160, same method, batch "
             "20, one step per round (the same forward passes over as many rows). Seconds: as "
             "each run's line says.", "",
             "Runs (each one process at nice 10, side by side with each other and with other "
             "jobs on the 2 cores, so seconds compare only roughly):", "", runs,
             "", "| round / step | " + head + " |", "|---|" + "---|---|" * len(res), *rows, ""]
    if "federated" in res and "pooled" in res:
        f, p = res["federated"]["curve"][-1], res["pooled"]["curve"][-1]
        if f[0] == p[0]:
            lines.append(f"Federated minus pooled after {f[0]} rounds: {(f[1] - p[1]) * 100:+.1f} "
                         "points (target: within 2 points).")
    if a.remark:
        lines += ["", a.remark]
    (RESULTS / "federated_sst2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-examples", type=int, default=300)
    ap.add_argument("--arms", default="federated,pooled",
                    help=f"comma-separated, run one after the other: {', '.join(ARMS)}")
    ap.add_argument("--aggregate", default="pooled", help="federated arm's --aggregate")
    ap.add_argument("--local-steps", type=int, default=4, help="fedavg arm: a device's "
                    "lora-adam steps a round")
    ap.add_argument("--fedavg-lr", type=float, default=0.0,
                    help="fedavg arm: lora-adam's learning rate (0: its default)")
    ap.add_argument("--stop-at", type=int, default=0,
                    help="the arms were stopped after this round: read their curves from "
                         "what they left in --out instead of running them")
    ap.add_argument("--remark", default="", help="a note added under the table (what the "
                    "runs' conditions were that the figures do not show)")
    ap.add_argument("--report-only", action="store_true",
                    help="only write the table from the arms saved in --out")
    ap.add_argument("--out", default="runs/federated_sst2")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # what every arm shares (the data sample, model)
    common = ["--task", "sst2", "--k", "80", "--eval-examples", str(a.eval_examples),
              "--model", "smollm2-135m", "--max-seq-length", "64", "--seed", "42",
              "--threads", "1"]
    for arm in ([] if a.report_only else a.arms.split(",")):
        if arm not in ARMS:
            raise SystemExit(f"--arms: unknown arm {arm!r}; available: {', '.join(ARMS)}")
        t0, load0 = time.time(), load()
        res = (STOPPED if a.stop_at else ARMS)[arm](a, out, common)
        res["stopped"] = bool(a.stop_at)
        res.update(command=f"python benchmarks/federated_sst2.py --rounds {a.rounds} --eval-every "
                           f"{a.eval_every} --eval-examples {a.eval_examples} --arms {arm}"
                           + (f" --aggregate {a.aggregate}" if arm == "federated" else "")
                           + (f" --local-steps {a.local_steps}" + (f" --fedavg-lr {a.fedavg_lr}"
                                                                   if a.fedavg_lr else "")
                              if arm == "fedavg" else ""),
                   machine=machine(), load_start=load0, load_end=load(),
                   load_during=sampled_load(out),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(res.pop("t0", t0))))
        (out / f"{arm}.json").write_text(json.dumps(res, indent=1))
    report(a, out)


if __name__ == "__main__":
    main()
