"""What every host of a program that trains itself does (`pocketllm export --trainable RUN.yaml
--out BUNDLE`), whatever runs the program: numpy and the standard library only -- no pocketllm,
no torch. `train_onnx.py` and `train_pte.py` each add a `Runner` for their runtime.

Each step hands the program the step's batch (BUNDLE/batches.npz), the step's keys (derived
here from the seed: `derive_key`, pocketllm.zo.noise's splitmix64 on Python ints), lr and eps;
the program returns the replicas' losses and the projected gradients and moves its state (the
LoRA tensors). The host appends the step's record to RUN_DIR/zo_log.jsonl (pocketllm's ZO log:
the header from the manifest, one fsynced JSON line a step); RUN_DIR also gets the run's
config.yaml, so `pocketllm replay --adapter-path RUN_DIR` rebuilds the adapter in torch, the
program's final state (state.npz) and host.json (losses, step times). A non-finite loss or
estimate stops the run before it is logged (the program keeps the state it had).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

FORMAT = "pocketllm-selftrain/1"
M64 = 0xFFFFFFFFFFFFFFFF
BATCH = ("input_ids", "attention_mask", "pos", "targets", "cands", "weight")


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def derive_key(seed: int, step: int, index: int) -> int:
    """pocketllm.zo.noise.derive_key (tests/test_selftrain.py checks it bit for bit)."""
    x = splitmix64(seed & M64)
    x = splitmix64(x ^ (step & M64))
    return splitmix64(x ^ (index & M64))


def step_keys(seed: int, step: int, queries: int, tensors: int) -> tuple[np.ndarray, np.ndarray]:
    """The step's keys as the program takes them: (k1, k2) int64 (queries, tensors), the low
    and high 32-bit words of keys[j][i] = derive_key(seed, step, j * tensors + i)."""
    keys = [[derive_key(seed, step, j * tensors + i) for i in range(tensors)]
            for j in range(queries)]
    return (np.array([[k & 0xFFFFFFFF for k in ks] for ks in keys], dtype=np.int64),
            np.array([[k >> 32 for k in ks] for ks in keys], dtype=np.int64))


class Runner:
    """A loaded program: `step` moves its state and returns (losses, projected grads)."""

    def step(self, batch: dict, k1, k2, lr: np.ndarray, eps: np.ndarray):
        raise NotImplementedError

    def state(self) -> np.ndarray:
        """The trained LoRA tensors, flat (the state the next step starts from)."""
        raise NotImplementedError


def load_bundle(bundle: Path) -> dict:
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {bundle}/manifest.json: {e} (pocketllm export --trainable "
                         "writes it)") from None
    if manifest.get("format") != FORMAT:
        raise SystemExit(f"error: {bundle}/manifest.json: format {manifest.get('format')!r}, "
                         f"not {FORMAT}")
    return manifest


def parse(argv, doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("bundle", type=Path, help="the folder pocketllm export --trainable wrote")
    p.add_argument("run_dir", type=Path, help="where the ZO log and the final state go")
    p.add_argument("--steps", type=int, default=0, help="steps to run (0: all the bundle's)")
    p.add_argument("--threads", type=int, default=0, help="the runtime's threads (0: its own)")
    return p.parse_args(argv)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux VmHWM; None elsewhere): what the phone's
    host holds at most, program, runtime and all."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def train(a: argparse.Namespace, manifest: dict, runner: Runner) -> int:
    """Run the steps, write the log, the final state and host.json; the exit status."""
    steps = a.steps or manifest["steps"]
    if steps > manifest["steps"]:
        raise SystemExit(f"error: --steps {steps}: the bundle holds {manifest['steps']} "
                         "batches (export again with a larger --steps)")
    batches = np.load(a.bundle / "batches.npz")
    keys = manifest["keys"]
    a.run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(a.bundle / "config.yaml", a.run_dir / "config.yaml")
    log = open(a.run_dir / "zo_log.jsonl", "w")

    def append(rec: dict) -> None:  # flushed and fsynced: a kill loses at most this line
        log.write(json.dumps(rec) + "\n")
        log.flush()
        os.fsync(log.fileno())
    append(manifest["log_header"])
    losses, replicas, times, stopped = [], [], [], None
    for t in range(steps):
        k1, k2 = step_keys(keys["seed"], t, keys["queries"], keys["tensors"])
        lr, eps = manifest["lr"][t], manifest["eps"][t]
        t0 = time.perf_counter()
        L, g = runner.step({n: batches[n][t] for n in BATCH}, k1, k2, np.array([lr]),
                           np.array([eps]))
        times.append(time.perf_counter() - t0)
        if not (np.isfinite(L).all() and np.isfinite(g).all()):
            stopped = f"step {t}: non-finite loss {L.tolist()} or estimate {g.tolist()}"
            break
        loss = float(np.mean(L.astype(np.float64)))
        append({"step": t, "projected_grads": [float(x) for x in g], "lr": lr, "eps": eps,
                "loss": loss})
        losses.append(loss)
        replicas.append(L.tolist())
    log.close()
    np.savez(a.run_dir / "state.npz", train=runner.state())
    report = {"steps": len(losses), "losses": losses, "replica_losses": replicas,
              "step_seconds": times, "threads": a.threads, "stopped": stopped,
              "torch_imported": "torch" in sys.modules, "peak_rss_mb": peak_rss_mb()}
    (a.run_dir / "host.json").write_text(json.dumps(report, indent=1))
    print(f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, median step "
          f"{sorted(times)[len(times) // 2]:.3f}s; log {a.run_dir / 'zo_log.jsonl'}"
          if losses else "no step completed")
    if stopped:
        print(f"error: {stopped}; stopped before logging it", file=sys.stderr)
        return 1
    return 0
