"""The benchmarks' workload: a model, a fixed batch, and one step of each method on it.

`python -m pocketllm.workload --mode M` runs a few steps of mode M in this (fresh) process and
prints one JSON line with its timings and peak RSS, which is how `pocketllm memory --measure`, the
framework's RSS (`memory_estimate.framework_mb`) and the memory table measure every mode in a
process of its own (`memory.run_in_fresh_process` starts it). A top-layer module: nothing in the
package imports it but the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch

from . import memory
from .config import TrainArgs
from .loss import (PlainHead, TokenStats, answer_transform, backbone, group_losses,
                   output_head, stream_head)
from .methods import build, get_method
from .models import MASKED_LM_TYPES, load_model
from .objectives import LanguageModeling
from .trainable import setup_trainable
from .zo.naive_mezo import naive_zo_step

MODES = ("inference", "inference-lora", "zo-full", "zo-lora", "naive-zo-full", "naive-zo-lora",
         "lora-adam", "adam")
# the method each training mode runs (the naive reference and inference run no method)
METHOD_OF = {"zo-full": "zo-sgd", "zo-lora": "zo-sgd", "lora-adam": "lora-adam", "adam": "adam"}


def mode_for(method: str, trainable: str) -> str:
    """The workload mode that runs `method` on `trainable` weights."""
    if method == "zo-sgd":
        return f"zo-{trainable}"
    return method  # inference, lora-adam, adam


def is_masked_lm(model) -> bool:
    return getattr(model.config, "model_type", "") in MASKED_LM_TYPES


def fixed_batch(vocab: int, batch: int, seq: int, seed: int = 0,
                masked: bool = False) -> dict[str, torch.Tensor]:
    """Random token ids. Causal LMs: every position scored, the dense case (all logits needed).
    Masked LMs: one scored position per row (a prompt's <mask>), at a random place >= 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if not masked:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    pos = torch.randint(1, seq, (batch,), generator=g)
    labels = torch.full_like(ids, -100)
    rows = torch.arange(batch)
    labels[rows, pos] = ids[rows, pos]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def masked_lm_stats(model, batch: dict[str, torch.Tensor], groups: int = 1,
                    head_view=None) -> TokenStats:
    """Cross-entropy of a masked LM at its scored positions (one per row), through the model's
    own MLM head (RoBERTa: dense, GELU, LayerNorm, then the vocabulary projection, streamed in
    chunks as `head_view` gives them by `loss.stream_head`, so a ZO run perturbs it like any
    other weight).

    The workload's stand-in for prompt-based classification: same forward, same head, the full
    vocabulary instead of the label words (a few logits per row either way)."""
    labels = batch["labels"]
    sel = labels != -100
    if not bool((sel.sum(1) == 1).all()):
        raise ValueError("masked_lm_stats: expected exactly one scored position per row")
    x = answer_transform(model)(backbone(model, batch)[sel])   # (B, H): row b is batch row b
    B = x.shape[0]
    p = stream_head(x, labels[sel], (head_view or PlainHead(output_head(model))).chunks(groups),
                    group_of=torch.arange(B) // (B // groups), groups=groups)
    return TokenStats(nll=p.nll, tokens=torch.ones_like(p.nll), correct=p.correct.detach())


class Scored:
    """The workload's objective: its batch scored by `stats` (n_scored: the rows or tokens)."""

    def __init__(self, stats):
        self.stats = stats

    def n_scored(self, batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())


def make_step(mode: str, model, batch, args: TrainArgs, **settings) -> Callable[[int], None]:
    """A callable running step i of `mode` on `batch` (LoRA/full already set by args;
    `settings`: the method's own, e.g. zo_passes)."""
    stats = masked_lm_stats if is_masked_lm(model) else LanguageModeling().stats
    eps = 1e-3 if args.trainable == "full" else 1e-2
    if mode.startswith("inference"):
        if mode == "inference-lora":
            setup_trainable(model, args)

        def run(i):
            with torch.no_grad():
                group_losses(stats(model, batch), 1)
        return run
    _, params = setup_trainable(model, args)
    if mode.startswith("naive-"):
        plist = [p for _, p in params]
        for p in plist:
            p.requires_grad_(False)

        def loss():
            return group_losses(stats(model, batch), 1).item()
        return lambda i: naive_zo_step(plist, loss, eps, args.learning_rate, seed=i)
    name = METHOD_OF[mode]
    if "eps" in {f.name for f in dataclasses.fields(get_method(name).Config)}:
        settings = {"eps": eps, **settings}
    method = build(name, model, params, args, Scored(stats), **settings)
    return lambda i: method.step([batch], i, args.learning_rate)


def train_args(mode: str, dtype: str, model: str, **kw) -> TrainArgs:
    trainable = "full" if mode.endswith("full") or mode == "adam" else "lora"
    return TrainArgs(model=model, dtype=dtype, trainable=trainable,
                     method=METHOD_OF.get(mode, "zo-sgd"),
                     learning_rate=1e-6 if trainable == "full" else 1e-3, **kw)


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
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--zo-passes", default="auto", choices=("auto", "pair", "sequential"))
    a = ap.parse_args()
    memory.tune_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_model(a.model, a.dtype)
    batch = fixed_batch(model.config.vocab_size, a.batch_size, a.seq, masked=is_masked_lm(model))
    args = train_args(a.mode, a.dtype, a.model, batch_size=a.batch_size, lora_rank=a.lora_rank,
                      max_seq_length=a.seq)
    settings = {"zo_passes": a.zo_passes} if METHOD_OF.get(a.mode) == "zo-sgd" else {}
    step = make_step(a.mode, model, batch, args, **settings)
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
