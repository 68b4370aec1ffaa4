"""The benchmarks' workload: a model, a fixed batch, and one step of a method on it.

`python -m pocketllm.workload --method NAME --trainable T` runs a few steps of NAME in this
(fresh) process and prints one JSON line with its timings and peak RSS, which is how `pocketllm
memory --measure`, the framework's RSS (`memory_estimate.framework_mb`) and the memory table
measure every method in a process of its own (`memory.run_in_fresh_process` starts it). NAME is
any registered method (its own settings as flags, as for `train`), or one of the runs that are
not methods (`REFERENCE`): `inference` (forward and loss, no grad; --trainable lora: through
LoRA layers) and `naive-zo` (the reference MeZO step, `zo.naive_mezo`). A top-layer module:
nothing in the package imports it but the CLI.
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
from .methods import Method, build, get_method
from .models import MASKED_LM_TYPES, load_model
from .objectives import LanguageModeling
from .quantize import SCHEMES
from .trainable import setup_trainable
from .zo.naive_mezo import naive_zo_step


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


def _inference(model, batch, args: TrainArgs, stats, eps: float) -> Callable[[int], None]:
    if args.trainable == "lora":
        setup_trainable(model, args)  # the forward through LoRA layers, as a LoRA run's

    def run(i):
        with torch.no_grad():
            group_losses(stats(model, batch), 1)
    return run


def _naive_zo(model, batch, args: TrainArgs, stats, eps: float) -> Callable[[int], None]:
    _, params = setup_trainable(model, args)
    plist = [p for _, p in params]
    for p in plist:
        p.requires_grad_(False)

    def loss():
        return group_losses(stats(model, batch), 1).item()
    return lambda i: naive_zo_step(plist, loss, eps, args.learning_rate, seed=i)


# the runs that are not training methods: name -> builder of its step
REFERENCE: dict[str, Callable] = {"inference": _inference, "naive-zo": _naive_zo}
# what a reference run trains or runs through (a method's own: its `trainable_kinds`)
REFERENCE_KINDS = ("full", "lora")


def names() -> tuple[str, ...]:
    """What `--method` accepts: the reference runs, then the registered methods."""
    from .methods import REGISTRY
    return (*REFERENCE, *sorted(REGISTRY))


def make_step(name: str, model, batch, args: TrainArgs, **settings) -> Callable[[int], None]:
    """A callable running step i of `name` (a reference run or a registered method, built by
    `methods.build` with its `settings`) on `batch`, on the weights `args.trainable` names."""
    stats = masked_lm_stats if is_masked_lm(model) else LanguageModeling().stats
    eps = 1e-3 if args.trainable == "full" else 1e-2
    if name in REFERENCE:
        if settings:
            raise SystemExit(f"--method {name} has no settings: "
                             f"{', '.join(k.replace('_', '-') for k in settings)}")
        return REFERENCE[name](model, batch, args, stats, eps)
    cls = get_method(name)
    if cls.steps is not Method.steps:  # e.g. split mode: its stream is not a step to time
        raise SystemExit(f"--method {name} drives its own steps (`steps`), which the workload "
                         "cannot time one `step` at a time (split mode's device: "
                         "benchmarks/split_bench.py)")
    _, params = cls.trainable(model, args)
    if "eps" in {f.name for f in dataclasses.fields(cls.Config)}:
        settings = {"eps": eps, **settings}
    method = build(name, model, params, args, Scored(stats), **settings)
    return lambda i: method.step([batch], i, args.learning_rate)


def train_args(name: str, trainable: str, dtype: str, model: str, **kw) -> TrainArgs:
    """The run settings of `name` on `trainable` weights (learning rate: 1e-6 full, 1e-3 LoRA)."""
    method = {"method": name} if name not in REFERENCE else {}
    return TrainArgs(model=model, dtype=dtype, trainable=trainable, **method,
                     learning_rate=1e-6 if trainable == "full" else 1e-3, **kw)


def main() -> None:
    from . import config as C
    from . import lean_import
    lean_import.install()  # a measured process of its own: as lean as `pocketllm` commands
    from .methods import REGISTRY, setting_classes, settings_for
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", choices=names(), required=True)
    ap.add_argument("--trainable", choices=("full", "lora"), default=None,
                    help="which weights (default: the method's first kind; inference, "
                         "naive-zo: full)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--quantize-base", default="none", choices=tuple(SCHEMES),
                    help="the base's Linear weights quantized at load (pocketllm.quantize)")
    ap.add_argument("--lora-layers", default="", help="LoRA on these layers only (as train)")
    C.add_args(ap.add_argument_group("method settings (as for train)"), *setting_classes())
    a = ap.parse_args()
    own = {"method", "trainable", "model", "dtype", "batch_size", "seq", "steps", "warmup",
           "threads", "lora_rank", "lora_layers", "config", "quantize_base"}
    given = {k: v for k, v in vars(a).items() if k not in own}
    if a.config:
        given = {**C.load_yaml(a.config, *setting_classes()), **given}
    settings = settings_for(a.method, given) if a.method in REGISTRY else given
    kinds = REGISTRY[a.method].trainable_kinds if a.method in REGISTRY else REFERENCE_KINDS
    trainable = a.trainable or kinds[0]
    memory.tune_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    scheme = a.quantize_base
    if settings.get("engine"):  # an engine that quantizes its own programs loads the float model
        from .engines import REGISTRY as ENGINES
        scheme = ENGINES.lookup(settings["engine"]).load_scheme(scheme)
    model, _ = load_model(a.model, a.dtype, scheme)
    batch = fixed_batch(model.config.vocab_size, a.batch_size, a.seq, masked=is_masked_lm(model))
    args = train_args(a.method, trainable, a.dtype, a.model, batch_size=a.batch_size,
                      lora_rank=a.lora_rank, lora_layers=a.lora_layers, max_seq_length=a.seq,
                      quantize_base=a.quantize_base)
    step = make_step(a.method, model, batch, args, **settings)
    rss_loaded = memory.rss_mb()
    peak_load = memory.peak_rss_mb()
    memory.reset_peak()
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        step(i)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"method": a.method, "trainable": trainable, "model": a.model,
                      "dtype": a.dtype, "quantize_base": a.quantize_base,
                      "batch": a.batch_size, "seq": a.seq,
                      "rss_loaded_mb": rss_loaded,
                      "peak_load_mb": peak_load, "peak_run_mb": memory.peak_rss_mb(),
                      "step_s_median": statistics.median(times), "step_s": times,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
