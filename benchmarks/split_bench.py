"""Split mode on the device: peak memory beside local training, bytes per step, OPT-1.3B shape.

    python benchmarks/split_bench.py [--model smollm2-135m] [--batch-size 8] [--seq 64]
    python benchmarks/split_bench.py --big random:opt-1.3b      # also the OPT-1.3B-shaped rows

1. Peak RSS of the device, each in a fresh process, after the model is loaded, over a few
   steps of a fixed batch (every position scored): inference; local zo-sgd (LoRA), lora-adam,
   adam (`pocketllm.workload`); and split mode against a real `pocketllm serve` on
   loopback (tap every layer, 8 bits), with private labels (the device runs the output head
   and returns the gradient) and without.
2. Bytes the device sends per step for 16/8/4 bits and --tap-every 1/2/4 (the serialized
   protobuf message, measured), and the time they take on a 10 and a 100 Mbit/s uplink beside
   the device's forward time (forward + taps + quantization, measured).
3. With --big: an OPT-1.3B-shaped backbone (random weights, the published config) in split mode
   against a stand-in for the server (the step's messages are built and kept as the queue would
   keep them, and the private-label head pass runs on a zero side output; no gRPC), beside its
   inference.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _run import RESULTS, ROOT, run_mode, start_server

sys.path.insert(0, str(ROOT))
from pocketllm.bench.machine import describe  # noqa: E402

# (workload --method, --trainable, label)
LOCAL = [("inference", "full", "inference (forward + loss, no grad)"),
         ("zo-sgd", "lora", "local zo-sgd, LoRA r=8 q/v"),
         ("lora-adam", "lora", "local lora-adam, LoRA r=8 q/v"),
         ("adam", "full", "local adam, full parameters")]
RATES = (10e6, 100e6)


# ---------------------------------------------------------------------------------------------
# The device side, in a process of its own (`--device-run`)
# ---------------------------------------------------------------------------------------------
def device_run(a) -> None:
    """Train a few steps of the fixed batch through split mode; print one JSON line."""
    import torch

    from pocketllm import memory
    from pocketllm.workload import fixed_batch
    from pocketllm.models import load_model
    from pocketllm.split.client import SplitClient, device_step
    from pocketllm.split.side import SideConfig, head_loss_grad, tap_layers

    from pocketllm.memory import limit_arenas, tune_allocator
    tune_allocator()
    limit_arenas(1)  # as `pocketllm train --method side` does on the device
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_model(a.model, a.dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = fixed_batch(model.config.vocab_size, a.batch_size, a.seq)
    cfg = SideConfig(model=a.model, hidden=model.config.hidden_size,
                     taps=tap_layers(model.config.num_hidden_layers, a.tap_every),
                     act_bits=a.bits, private_labels=a.private)
    head = model.get_output_embeddings()
    head_t = (head.weight.detach(), None if head.bias is None else head.bias.detach())
    rss_loaded = memory.rss_mb()
    memory.reset_peak()
    steps = a.warmup + a.steps
    t0 = time.perf_counter()
    if a.server:
        client = SplitClient(a.server, Path(a.token_file).read_text().strip())
        acks = []
        client.train(secrets.token_hex(16), cfg, lambda s: device_step(model, batch, cfg, s),
                     steps, head_t if a.private else None,
                     lambda s, loss, item: acks.append((time.perf_counter(), item)),
                     queue_depth=2)
        client.close()
        times = [acks[i][0] - acks[i - 1][0] for i in range(a.warmup + 1, steps)] or \
            [acks[-1][0] - t0]
        fwd = [it.forward_s for _, it in acks[a.warmup:]]
    else:  # stand-in server: keep queue-depth + 1 messages alive, run the head pass locally
        kept, times, fwd = [], [], []
        for s in range(1, steps + 1):
            t1 = time.perf_counter()
            item = device_step(model, batch, cfg, s)
            if a.private:
                head_loss_grad(item.final, item.targets, *head_t)
            kept = (kept + [item])[-3:]
            if s > a.warmup:
                times.append(time.perf_counter() - t1)
                fwd.append(item.forward_s)
    print(json.dumps({"peak_run_mb": memory.peak_rss_mb(), "rss_loaded_mb": rss_loaded,
                      "step_s_median": statistics.median(times),
                      "forward_s_median": statistics.median(fwd),
                      "threads": torch.get_num_threads()}))


def run_device(model: str, server: str | None, token_file: str | None, private: bool, a) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device-run", "--model", model,
           "--batch-size", str(a.batch_size), "--seq", str(a.seq), "--dtype", a.dtype,
           "--steps", str(a.steps), "--threads", str(a.threads)]
    if server:
        cmd += ["--server", server, "--token-file", token_file]
    if private:
        cmd += ["--private"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Bytes per step
# ---------------------------------------------------------------------------------------------
def bytes_table(a) -> list[list]:
    import torch

    from pocketllm.workload import fixed_batch
    from pocketllm.models import load_model
    from pocketllm.split.client import device_step
    from pocketllm.split.side import SideConfig, tap_layers

    from pocketllm.memory import tune_allocator
    tune_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_model(a.model, a.dtype)
    model.eval()
    batch = fixed_batch(model.config.vocab_size, a.batch_size, a.seq)
    n = model.config.num_hidden_layers
    rows = []
    for every in (1, 2, 4):
        for bits in (16, 8, 4):
            cfg = SideConfig(model=a.model, hidden=model.config.hidden_size,
                             taps=tap_layers(n, every), act_bits=bits, private_labels=True)
            device_step(model, batch, cfg, 1)  # warm
            items = [device_step(model, batch, cfg, s) for s in (1, 2)]
            sent = items[-1].wire_bytes
            cfg_off = SideConfig(**{**cfg.__dict__, "private_labels": False})
            sent_off = device_step(model, batch, cfg_off, 1).wire_bytes
            fwd = min(i.forward_s for i in items)
            rows.append([every, len(cfg.taps), bits, f"{sent / 1e6:.2f}", f"{sent_off / 1e6:.2f}",
                         *[f"{sent * 8 / r:.2f}" for r in RATES], f"{fwd:.2f}",
                         "yes" if sent * 8 / RATES[0] <= fwd else "no"])
            print(rows[-1], flush=True)
    return rows


def wire_table(a) -> list[list]:
    """Bytes per step from the wire format alone (no model run): `step_bytes`, the exact
    payload of the quantized tensors, protobuf framing excluded (a few bytes per tensor)."""
    from pocketllm.split.client import step_bytes
    from pocketllm.split.side import SideConfig, tap_layers
    rows, n = [], a.layers
    for every in (1, 2, 4):
        for bits in (16, 8, 4):
            cfg = SideConfig(model=a.model, hidden=a.hidden, taps=tap_layers(n, every),
                             act_bits=bits, private_labels=True)
            cfg_off = SideConfig(**{**cfg.__dict__, "private_labels": False})
            N = a.batch_size * (a.seq - 1)  # every position but the last predicts a label
            sent, sent_off = step_bytes(N, cfg), step_bytes(N, cfg_off)
            rows.append([every, len(cfg.taps), bits, f"{sent / 1e6:.2f}", f"{sent_off / 1e6:.2f}",
                         *[f"{sent * 8 / r:.2f}" for r in RATES], a.forward_s or "-",
                         "-" if not a.forward_s else
                         ("yes" if sent * 8 / RATES[0] <= a.forward_s else "no")])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--big", default="", help="also measure this backbone (random:opt-1.3b)")
    ap.add_argument("--only", default="", choices=("", "memory", "bytes", "big", "wire"))
    ap.add_argument("--hidden", type=int, default=576, help="--only wire: hidden size")
    ap.add_argument("--layers", type=int, default=30, help="--only wire: layers")
    ap.add_argument("--forward-s", type=float, default=0.0,
                    help="--only wire: a measured device forward time to compare with")
    ap.add_argument("--out", default="split.md")
    # --device-run: the device process itself
    ap.add_argument("--device-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server", default="")
    ap.add_argument("--token-file", default="")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--tap-every", type=int, default=1)
    ap.add_argument("--bits", type=int, default=8)
    a = ap.parse_args()
    if a.device_run:
        return device_run(a)
    load = os.getloadavg()
    t_start = time.time()
    mem_rows, byte_rows, big_rows = [], [], []
    if a.only in ("", "memory"):
        res = {}
        for method, trainable, label in LOCAL:
            res[label] = run_mode(method, trainable=trainable, model=a.model,
                                  batch_size=a.batch_size, seq=a.seq, dtype=a.dtype,
                                  steps=a.steps, threads=a.threads)
            print(label, res[label], flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            proc, addr, token = start_server(Path(tmp), 1, [a.model])
            try:
                for private in (True, False):
                    label = (f"split, every layer at 8 bits, labels "
                             f"{'private (head on device)' if private else 'sent'}")
                    res[label] = run_device(a.model, addr, token, private, a)
                    print(label, res[label], flush=True)
            finally:
                proc.terminate()
                proc.wait()
        inf = res[LOCAL[0][2]]["peak_run_mb"]
        adam = res[LOCAL[3][2]]["peak_run_mb"]
        for label, r in res.items():
            mem_rows.append([label, f"{r['peak_run_mb']:.0f}", f"{r['peak_run_mb'] / inf:.3f}",
                             f"{adam / r['peak_run_mb']:.2f}", f"{r['step_s_median']:.2f}"])
    if a.only in ("", "bytes"):
        byte_rows = bytes_table(a)
    if a.only == "wire":
        byte_rows = wire_table(a)
    if a.big and a.only in ("", "big"):
        inf = run_mode("inference", model=a.big, batch_size=a.batch_size, seq=a.seq,
                       dtype=a.dtype, steps=1, warmup=0, threads=a.threads)
        big = {"inference (forward + loss, no grad)": inf}
        for private in (True, False):
            small = argparse.Namespace(**{**vars(a), "steps": 1})
            big[f"split (stand-in server), every layer at 8 bits, labels "
                f"{'private' if private else 'sent'}"] = run_device(a.big, None, None, private, small)
        for label, r in big.items():
            big_rows.append([label, f"{r['peak_run_mb']:.0f}", f"{r['peak_run_mb'] / inf['peak_run_mb']:.3f}",
                             f"{r['step_s_median']:.1f}"])
            print(big_rows[-1], flush=True)

    notes = [f"Load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
             f"on a machine shared with other jobs; finished in {time.time() - t_start:.0f}s.", ""]
    if mem_rows:
        notes += [f"## Device peak RSS ({a.model}, {a.dtype}, batch {a.batch_size} x {a.seq})", "",
                  "| run | peak RSS (run) MB | vs inference | adam / this | step s |",
                  "|---|---|---|---|---|", *["| " + " | ".join(map(str, r)) + " |" for r in mem_rows], ""]
    if byte_rows:
        notes += [f"## Bytes sent per step ({a.model}, batch {a.batch_size} x {a.seq}, every "
                  "position scored)", "",
                  "| tap every | taps | bits | MB/step (private labels) | MB/step (labels sent) | "
                  "s at 10 Mbit/s | s at 100 Mbit/s | device forward s | 10 Mbit/s keeps up |",
                  "|---|---|---|---|---|---|---|---|---|",
                  *["| " + " | ".join(map(str, r)) + " |" for r in byte_rows], ""]
    if big_rows:
        notes += [f"## {a.big} backbone ({a.dtype}, batch {a.batch_size} x {a.seq})", "",
                  "| run | peak RSS (run) MB | vs inference | step s |", "|---|---|---|---|",
                  *["| " + " | ".join(map(str, r)) + " |" for r in big_rows], ""]
    cmd = "python benchmarks/split_bench.py " + " ".join(sys.argv[1:])
    head = ["# Split mode (server-assisted side tuning): the device's side", "",
            f"Command: `{cmd.strip()}`  ", f"Machine: {describe()}  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
            __doc__.split("\n\n", 2)[2].strip(), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / a.out).write_text("\n".join(head + notes) + "\n")
    print("\n".join(head + notes))


if __name__ == "__main__":
    main()
