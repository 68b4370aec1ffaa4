"""Run settings: one dataclass per subcommand whose fields carry their help.

The CLI flags are generated from the fields (`--learning-rate` for `learning_rate`); a YAML file
given with `-c` uses the same names (either spelling), and flags given on the command line
override it. The resolved settings are written beside every output (`config.yaml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def opt(default: Any, help: str, choices: tuple | None = None, **kw) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelArgs:
    model: str = opt("smollm2-135m", "model: alias (smollm2-135m, tiny-llama, tiny-gpt2, "
                     "tiny-opt, tiny-gemma, tiny-roberta; random-weight shapes random:opt-1.3b, "
                     "random:roberta-large, random:smollm2-135m), local HF directory, .gguf "
                     "file, or hub id")
    dtype: str = opt("float32", "weights' dtype", choices=("float32", "bfloat16"))
    seed: int = opt(0, "random seed: data order, LoRA init and perturbations")


@dataclass
class DataArgs:
    data: str = opt("examples/personal", "directory with train.jsonl / valid.jsonl / test.jsonl")
    max_seq_length: int = opt(256, "truncate records to this many tokens")
    mask_prompt: bool = opt(True, "train on the completion only (prompt/completion, messages)")


@dataclass
class TrainArgs(ModelArgs, DataArgs):
    method: str = opt("zo-sgd", "training method (see `pocketllm methods`)")
    trainable: str = opt("lora", "which weights to train", choices=("full", "lora"))
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: float = opt(16.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = opt(0.0, "LoRA dropout (first-order methods only)")
    lora_targets: list = opt([], "module names to adapt (default: the query/value projections)")
    iters: int = opt(200, "training steps")
    batch_size: int = opt(8, "sequences per micro-batch")
    grad_accumulation: int = opt(1, "micro-batches per step (ZO: the same perturbation for all)")
    learning_rate: float = opt(1e-3, "learning rate")
    eps: float = opt(1e-2, "ZO perturbation scale")
    perturbation: str = opt("gaussian", "ZO perturbation distribution",
                            choices=("gaussian", "rademacher"))
    zo_passes: str = opt("auto", "ZO: 'pair' runs the +eps/-eps passes as one forward over the "
                         "batch twice (z generated once); 'sequential' runs two forwards "
                         "(activations of one batch); 'auto': pair for LoRA, sequential for "
                         "full parameters (the faster of the two for each, measured)",
                         choices=("auto", "pair", "sequential"))
    weight_decay: float = opt(0.0, "weight decay (lora-adam)")
    adapter_path: str = opt("adapters", "output directory (adapter, logs, config)")
    resume: bool = opt(False, "continue the run in --adapter-path exactly where it stopped")
    save_every: int = opt(100, "save the adapter / checkpoint every N steps (0: only at the end)")
    steps_per_eval: int = opt(50, "evaluate on valid every N steps (0: only before and after)")
    steps_per_report: int = opt(10, "print a report line every N steps")
    val_batches: int = opt(-1, "validation batches per evaluation (-1: the whole split)")
    eval_batch_size: int = opt(16, "sequences per evaluation batch")
    threads: int = opt(0, "torch threads (0: torch's default)")


@dataclass
class EvalArgs(ModelArgs, DataArgs):
    split: str = opt("test", "which split of --data to score (or a path to a .jsonl file)")
    adapter_path: str = opt("", "LoRA adapter directory (empty: the base model)")
    batch_size: int = opt(16, "sequences per batch")
    max_batches: int = opt(-1, "stop after N batches (-1: all)")


@dataclass
class GenerateArgs(ModelArgs):
    prompt: str = opt("", "the prompt")
    adapter_path: str = opt("", "LoRA adapter directory (empty: the base model)")
    max_tokens: int = opt(64, "tokens to generate")
    temp: float = opt(0.0, "sampling temperature (0: greedy)")
    chat: bool = opt(False, "wrap the prompt in the tokenizer's chat template")


@dataclass
class FuseArgs(ModelArgs):
    adapter_path: str = opt("adapters", "LoRA adapter to merge")
    save_path: str = opt("fused_model", "where to write the merged HF model directory")


@dataclass
class ReplayArgs(ModelArgs):
    adapter_path: str = opt("adapters", "directory of a zo-sgd run (its zo_log.jsonl)")
    save_path: str = opt("replayed_model", "where to write the rebuilt model / adapter")


@dataclass
class MemoryArgs(ModelArgs):
    method: str = opt("zo-sgd", "what to estimate", choices=("inference", "zo-sgd", "lora-adam",
                                                              "adam"))
    trainable: str = opt("lora", "which weights train", choices=("full", "lora"))
    batch_size: int = opt(8, "sequences per micro-batch")
    max_seq_length: int = opt(256, "tokens per sequence (every sequence assumed this long; a "
                              "causal LM scores every position, a masked LM one <mask> per row)")
    lora_rank: int = opt(8, "LoRA rank r")
    lora_targets: list = opt([], "module names to adapt (default: the query/value projections)")
    zo_passes: str = opt("auto", "zo-sgd passes, as for train", choices=("auto", "pair",
                                                                        "sequential"))
    measure: bool = opt(False, "also run it in a fresh process and print the measured peak RSS")
    steps: int = opt(1, "--measure: measured steps (first-order methods run one more, "
                     "unmeasured, first: AdamW's state exists from the second step on)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field. Defaults are suppressed so we can tell what was given."""
    parser.add_argument("-c", "--config", default=None, help="YAML file of settings")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = kind
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag(f.name), dest=f.name, **kw)


def resolve(cls: type, ns: argparse.Namespace):
    """Defaults < YAML config < command-line flags."""
    values: dict[str, Any] = {}
    given = vars(ns).copy()
    cfg_path = given.pop("config", None)
    given.pop("command", None)
    if cfg_path:
        values.update(load_yaml(cfg_path, cls))
    values.update(given)
    return cls(**values)


def load_yaml(path: str | os.PathLike, cls: type) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"{p}: expected a mapping of setting: value")
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in raw.items():
        name = str(k).replace("-", "_")
        if name not in hints:
            raise SystemExit(f"{p}: unknown setting {k!r}; valid: "
                             f"{', '.join(sorted(h.replace('_', '-') for h in hints))}")
        kind = hints[name]
        if kind is list and isinstance(v, str):
            v = [v]
        if kind is float and isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                v = float(v)  # YAML reads 1e-3 as a string
            except ValueError:
                raise SystemExit(f"{p}: setting {k!r}: expected a number, got {v!r}") from None
        if not isinstance(v, kind) and not (kind is float and isinstance(v, int)):
            raise SystemExit(f"{p}: setting {k!r}: expected {kind.__name__}, got {v!r}")
        out[name] = v
    return out


def save_yaml(args: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(args), sort_keys=False))
