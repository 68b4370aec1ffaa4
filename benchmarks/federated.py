"""Federated zeroth-order fine-tuning on Flower: bytes on the wire, and scale.

1. Bytes per device per round, measured on the messages of a simulated federation of the
   default model (every message captured as it is sent and received, serialised as Flower
   serialises it): a steady round's request (the previous round's update; the round's seeds
   are drawn on the device) and reply (the device's losses under the default --aggregate
   pooled, and a weights hash), for --queries 16. Beside them, FedAvg of
   LoRA deltas of the same model (the adapter down and the updated adapter up each round: its
   tensors counted on the model, and serialised as a Flower ArrayRecord) and split mode
   (the per-step upload measured in benchmarks/results/split.md).
2. Scale: --clients 10 / 100 / 1000 simulated devices of a tiny model on Flower's Simulation
   Engine (Ray, one CPU), each in a fresh process: seconds a round, rounds a minute, the
   server's own work a round (the protocol: requests, checks, aggregation, the log; not
   waiting for devices) and the driver process's peak RSS (the ServerApp thread, Flower's
   in-memory SuperLink and the Ray driver).

    python benchmarks/federated.py [--sizes 10,100,1000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- 1. bytes ----------------------------------------------------------------------------
def measure_bytes(model: str, queries: int, rounds: int, out: Path) -> dict:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from pocketllm.config import FederateArgs
    from pocketllm.federated import wire
    from pocketllm.federated.simulate import simulate
    sizes = []

    def tap(direction, msg):
        content = sum(len(msg.content[k].deflate()) for k in msg.content)
        whole = sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())
        rnd = (wire.unpack_request(msg.content, queries) if direction == "out"
               else wire.unpack_reply(msg.content)).get("round")
        sizes.append({"dir": direction, "type": msg.metadata.message_type, "round": rnd,
                      "content": content, "message": whole})
    args = FederateArgs(model=model, clients=3, iters=rounds, batch_size=2,
                        max_seq_length=64, adapter_path=str(out), threads=1, eval_before=False,
                        val_batches=1)
    summary = simulate(args, {"queries": queries}, tap=tap)
    steady = [s for s in sizes if s["type"] == "train" and s["round"] and s["round"] >= 1]

    def most(direction, key):
        return max(s[key] for s in steady if s["dir"] == direction)
    return {"request_content": most("out", "content"), "request_message": most("out", "message"),
            "reply_content": most("in", "content"), "reply_message": most("in", "message"),
            "agree": summary["agree"], "rounds": summary["rounds"],
            "round_seconds": summary["round_seconds"]}


def lora_bytes(model: str) -> dict:
    """The LoRA adapter FedAvg ships (the default LoRA: rank 8 on the query/value projections)."""
    from flwr.app import ArrayRecord

    from pocketllm.config import TrainArgs
    from pocketllm.models import load_model
    from pocketllm.trainable import setup_trainable
    m, _ = load_model(model)
    _, params = setup_trainable(m, TrainArgs(model=model, trainable="lora"))
    n = sum(p.numel() for _, p in params)
    rec = ArrayRecord({k: p.detach().clone() for k, p in params})
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    serial = sum(len(o.deflate()) for o in get_all_nested_objects(rec).values())
    return {"params": n, "fp32_bytes": 4 * n, "record_bytes": serial}


# ---- 2. scale ----------------------------------------------------------------------------
def scale_child(n: int, rounds: int, out: Path) -> None:
    """One simulated federation of `n` tiny devices; prints its figures as JSON."""
    import json as _json

    from pocketllm.config import FederateArgs
    from pocketllm.federated.simulate import simulate
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    recs = [{"prompt": f"Item {i % 97}:",
             "completion": [" money", " work", " health"][i % 3]} for i in range(max(n, 16))]
    (data / "train.jsonl").write_text("\n".join(_json.dumps(r) for r in recs) + "\n")
    (data / "valid.jsonl").write_text("\n".join(_json.dumps(r) for r in recs[:8]) + "\n")
    args = FederateArgs(model="tiny-llama", data=str(data), clients=n, iters=rounds,
                        batch_size=1, max_seq_length=64, adapter_path=str(out / "run"),
                        threads=1, lora_rank=4, val_batches=1, round_timeout=3600)
    import flwr.simulation  # noqa: F401  (loaded before the baseline: not the run's memory)
    import ray  # noqa: F401

    from pocketllm.memory import peak_rss_mb, reset_peak, rss_mb
    reset_peak()
    before = rss_mb()
    s = simulate(args, {"queries": 16}, rebuild=False)
    print("RESULT " + _json.dumps({"n": n, "round_seconds": s["round_seconds"],
                                   "server_seconds": s["server_seconds"], "agree": s["agree"],
                                   "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
                                   "wall": s["wall_seconds"]}), flush=True)


def run_scale(n: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run([sys.executable, __file__, "--child", str(n), "--rounds", str(rounds),
                            "--out", tmp], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"--clients {n} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.child:
        return scale_child(a.child, a.rounds, Path(a.out))
    t0, load0 = time.time(), load()
    with tempfile.TemporaryDirectory() as tmp:
        wire = measure_bytes(a.model, 16, 3, Path(tmp) / "bytes")
    lora = lora_bytes(a.model)
    scale = [run_scale(int(n), a.rounds) for n in a.sizes.split(",")]
    load1 = load()

    per_round = wire["request_message"] + wire["reply_message"]
    fedavg = 2 * lora["record_bytes"]
    split_mb = {"8 bits, every layer": 8.77, "4 bits, every 4th layer": 1.03}
    lines = ["# Federated zeroth-order fine-tuning on Flower: bytes on the wire and scale", "",
             f"Command: `python benchmarks/federated.py --sizes {a.sizes} --rounds {a.rounds}`  ",
             f"Machine: {machine()}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
             f"(1/5/15 min) {load0} at start, {load1} at the end, on a machine shared with "
             f"other jobs; {time.time() - t0:.0f} s in all", "",
             f"## Bytes per device per round ({a.model}, --queries 16)", "",
             "Measured on every message of a 3-device simulated federation of "
             f"{a.model} ({wire['rounds']} rounds, all {wire['agree']} devices ending on the "
             "same weights), serialised as Flower serialises them; a steady round (a device "
             "sampled every round) is its request and its reply.", "",
             "| what crosses the wire | down (B) | up (B) | per device per round | vs ZO |",
             "|---|---|---|---|---|",
             f"| federated ZO, records only (one packed field: coefficients or losses, hash, round metadata) | "
             f"{wire['request_content']} | {wire['reply_content']} | "
             f"{wire['request_content'] + wire['reply_content']} B | |",
             f"| federated ZO, whole Flower messages (with Flower's metadata) | "
             f"{wire['request_message']} | {wire['reply_message']} | {per_round} B | 1 |",
             f"| FedAvg of LoRA deltas (r=8 q/v: {lora['params']:,} parameters, "
             f"{lora['fp32_bytes'] / 1e6:.2f} MB fp32; as an ArrayRecord) | "
             f"{lora['record_bytes']:,} | {lora['record_bytes']:,} | {fedavg / 1e6:.2f} MB | "
             f"{fedavg / per_round:,.0f}x |"]
    for what, mb in split_mb.items():
        lines.append(f"| split mode, {what}, batch 8 x 64 (per step, up; "
                     f"benchmarks/results/split.md) | | {mb} MB | {mb} MB | "
                     f"{mb * 1e6 / per_round:,.0f}x |")
    target = "met" if per_round < 1024 else "MISSED"
    from pocketllm.federated import wire as w
    catch = w.REQ_ROUND.size + 4 * 16
    lines += ["", f"Target under 1 KB per device per round of 16 queries, Flower's envelope "
              f"included: **{target}** ({per_round} B whole messages, "
              f"{wire['request_content'] + wire['reply_content']} B of records; "
              "--aggregate pooled, the default: the reply carries 17 float32 losses). Each "
              "message is one ConfigRecord with one packed bytes field (docs/federated.md "
              "lists it byte by byte); the round's seeds are not sent (a device draws them "
              "from the run seed and the round). A device that missed rounds is sent each "
              f"missed round as well: 16 float32 coefficients, a float32 learning rate and "
              f"a 32-byte hash, {catch} B a round.", "",
              "## Scale (tiny-llama devices, LoRA r=4, --queries 16, one Ray CPU)", "",
              "| simulated devices | s / round | rounds / min | server's own work / round (ms) "
              "| driver RSS before -> peak (MB) | devices agreeing at the end |",
              "|---|---|---|---|---|---|"]
    for s in scale:
        r = s["round_seconds"][1:] or s["round_seconds"]  # round 0 also starts the workers
        own = s["server_seconds"][1:] or s["server_seconds"]
        mean = sum(r) / len(r)
        lines.append(f"| {s['n']} | {mean:.2f} | {60 / mean:.1f} | "
                     f"{1000 * sum(own) / len(own):.1f} | {s['rss_before_mb']:.0f} -> "
                     f"{s['peak_rss_mb']:.0f} | "
                     f"{s['agree']}/{s['n']} |")
    lines += ["", "Round 0 (Ray's workers start and load the model) is left out of the "
              "means. A round's seconds are the devices' work, one at a time on one CPU "
              "(each simulated device loads its weights from its Context.state, catches up, "
              "probes 16 queries), plus Flower's message passing; the server's own work is "
              "what the protocol costs the server, which depends on the number of devices and "
              "queries, never on the model (it holds no weights, only the log). The driver's "
              "RSS: before the run (torch, Flower and Ray imported) and its peak during the "
              "run (the ServerApp thread, Flower's in-memory SuperLink with the round's "
              "messages and every simulated device's Context.state, and Ray's driver)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "federated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
