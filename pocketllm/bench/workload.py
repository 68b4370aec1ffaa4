"""The benchmarks' workload: a model, a fixed batch, and one step of each method on it.

`python -m pocketllm.bench.workload --mode M` runs a few steps of mode M in this (fresh)
process and prints one JSON line with its timings and peak RSS, which is how the memory table
measures every mode in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from .. import memory
from ..config import TrainArgs
from ..loss import group_losses, token_stats
from ..methods import get_method
from ..models import load_model
from ..train import setup_trainable
from .naive_mezo import naive_zo_step

MODES = ("inference", "inference-lora", "zo-full", "zo-lora", "naive-zo-full", "naive-zo-lora", "lora-adam")


def fixed_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids, every position scored: the dense case (all logits needed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_step(mode: str, model, batch, args: TrainArgs) -> Callable[[int], None]:
    """A callable running step i of `mode` on `batch` (LoRA/full already set by args)."""
    if mode.startswith("inference"):
        if mode == "inference-lora":
            setup_trainable(model, args)

        def run(i):
            with torch.no_grad():
                group_losses(token_stats(model, batch), 1)
        return run
    _, params = setup_trainable(model, args)
    if mode.startswith("naive-"):
        plist = [p for _, p in params]
        for p in plist:
            p.requires_grad_(False)

        def loss():
            return group_losses(token_stats(model, batch), 1).item()
        return lambda i: naive_zo_step(plist, loss, args.eps, args.learning_rate, seed=i)
    method = get_method("lora-adam" if mode == "lora-adam" else "zo-sgd")(model, params, args)
    return lambda i: method.step([batch], i, args.learning_rate)


def train_args(mode: str, dtype: str, model: str, **kw) -> TrainArgs:
    trainable = "full" if mode.endswith("full") else "lora"
    return TrainArgs(model=model, dtype=dtype, trainable=trainable,
                     method="lora-adam" if mode == "lora-adam" else "zo-sgd",
                     learning_rate=1e-6 if trainable == "full" else 1e-3,
                     eps=1e-3 if trainable == "full" else 1e-2, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_model(a.model, a.dtype)
    batch = fixed_batch(model.config.vocab_size, a.batch_size, a.seq)
    args = train_args(a.mode, a.dtype, a.model, batch_size=a.batch_size)
    step = make_step(a.mode, model, batch, args)
    rss_loaded = memory.rss_mb()
    peak_load = memory.peak_rss_mb()
    memory.reset_peak()
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        step(i)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"mode": a.mode, "model": a.model, "dtype": a.dtype,
                      "batch": a.batch_size, "seq": a.seq, "rss_loaded_mb": rss_loaded,
                      "peak_load_mb": peak_load, "peak_run_mb": memory.peak_rss_mb(),
                      "step_s_median": statistics.median(times), "step_s": times,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
