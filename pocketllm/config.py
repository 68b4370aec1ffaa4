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

from .schedules import SHAPES


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
    data: str = opt("", "directory with train.jsonl / valid.jsonl / test.jsonl (default: "
                    "examples/personal), or a task's folder (default with --task: "
                    "$POCKETLLM_DATA/<task> or ../shared/data/<task>)")
    max_seq_length: int = opt(256, "truncate records to this many tokens")
    mask_prompt: bool = opt(True, "train on the completion only (prompt/completion, messages)")
    task: str = opt("", "prompt-based task instead of .jsonl records: sst2, rte, cb, boolq, "
                    "copa, trec, or custom (with --template and --label-words)")
    k: int = opt(16, "task: training examples per class, sampled with --seed (0: all); a "
                 "validation split of k per class is drawn the same way")
    eval_examples: int = opt(1000, "task: cap on the dev/test examples scored (0: all)")
    template: str = opt("", "custom task: prompt template with {field} placeholders and, for "
                        "masked LMs, {mask}, e.g. '{text} It was'")
    label_words: list = opt([], "custom task: LABEL=WORD pairs, e.g. 0=' bad' 1=' good' (the "
                            "label values of the records' 'label' field)")

    def data_dir(self) -> str:
        if self.data:
            return self.data
        if self.task and self.task != "custom":
            from .data.tasks import default_data_dir
            return str(default_data_dir(self.task))
        return "examples/personal"

    def label_word_map(self) -> dict[str, str]:
        out = {}
        for pair in self.label_words:
            key, sep, word = str(pair).partition("=")
            if not sep:
                raise SystemExit(f"--label-words: {pair!r} is not LABEL=WORD")
            out[key] = word
        return out


@dataclass
class TrainArgs(ModelArgs, DataArgs):
    method: str = opt("zo-sgd", "training method (see `pocketllm methods`); its own settings "
                      "are the flags its section of `pocketllm methods` lists")
    trainable: str = opt("lora", "which weights to train", choices=lambda: _trainable_sets())
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: float = opt(16.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = opt(0.0, "LoRA dropout (first-order methods only)")
    lora_targets: list = opt([], "module names to adapt (default: the query/value projections)")
    num_virtual_tokens: int = opt(8, "--trainable prefix: learned virtual tokens before every "
                                  "input (prompt tuning)")
    iters: int = opt(200, "training steps")
    batch_size: int = opt(8, "sequences per micro-batch")
    grad_accumulation: int = opt(1, "micro-batches per step (ZO: the same perturbation for all)")
    learning_rate: float = opt(0.0, "learning rate (0: the method's default for --trainable, "
                               "`pocketllm methods` lists them)")
    lora_fa: bool = opt(False, "LoRA-FA: A stays frozen at its random init, only B is trained")
    lr_schedule: str = opt("auto", "learning-rate schedule (to --lr-final); auto: the method's "
                           "default (linear for ZO LoRA on a task, constant otherwise)",
                           choices=lambda: ("auto", *SHAPES))
    lr_final: float = opt(0.0, "final learning rate of a linear/cosine schedule")
    lr_warmup: int = opt(0, "steps of linear learning-rate warmup from 0")
    adapter_path: str = opt("adapters", "output directory (adapter, logs, config)")
    time_budget: float = opt(0.0, "stop after this many minutes of training (steps only, "
                             "evaluation excluded; the whole run's, across --resume; 0: "
                             "--iters alone); the schedules still run over --iters")
    resume: bool = opt(False, "continue the run in --adapter-path exactly where it stopped")
    save_every: int = opt(100, "save the adapter / checkpoint every N steps (0: only at the end)")
    steps_per_eval: int = opt(50, "evaluate on valid every N steps (0: only before and after)")
    keep_best: bool = opt(False, "also keep the adapter that scored best on valid (accuracy "
                          "for a task, else loss) at any evaluation, in ADAPTER_PATH/best/")
    steps_per_report: int = opt(10, "print a report line every N steps")
    eval_before: bool = opt(True, "evaluate before training (the zero-shot figure for a task)")
    test_every: int = opt(0, "task: score the dev/test set every N steps (0: only before and "
                          "after); logged as test_accuracy with the wall-clock time")
    val_batches: int = opt(-1, "validation batches per evaluation (-1: the whole split)")
    eval_batch_size: int = opt(16, "sequences per evaluation batch")
    threads: int = opt(0, "torch threads (0: torch's default)")


@dataclass
class ServeArgs:
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(50051, "port (0: any free port, see --port-file)")
    token_file: str = opt("", "file holding the access token clients must present")
    tls_cert: str = opt("", "PEM certificate chain for TLS (with --tls-key)")
    tls_key: str = opt("", "PEM private key for TLS")
    state_dir: str = opt("split_state", "where sessions are checkpointed (and resumed from)")
    models: list = opt([], "public models whose output heads sessions may train against "
                       "(default: the built-in aliases)")
    max_message_mb: int = opt(64, "largest message accepted or sent, MiB")
    workers: int = opt(16, "RPC worker threads (concurrent streams)")
    threads: int = opt(0, "torch threads (0: torch's default)")
    port_file: str = opt("", "write the bound port here once listening")
    # limits (README "Split server limits"; printed at start-up)
    max_side_params: int = opt(8_000_000, "limit: side-network parameters per session (taps x "
                               "width x depth; a larger one is refused at Open)")
    max_step_mb: int = opt(512, "limit: server memory one training step may take, MiB, "
                           "estimated from its rows, taps and candidates before it is read")
    max_sessions: int = opt(256, "limit: sessions on the server, all tokens together (each "
                            "checkpointed in --state-dir until deleted)")
    max_sessions_per_token: int = opt(64, "limit: sessions one token may hold (--token-file "
                                      "may list several tokens, one per line)")
    max_resident_sessions: int = opt(32, "limit: sessions held in memory (>= --workers); the "
                                     "least recently used idle one is evicted to its checkpoint "
                                     "and reloaded when next used")


@dataclass
class EvalArgs(ModelArgs, DataArgs):
    split: str = opt("test", "which split of --data to score (or a path to a .jsonl file)")
    adapter_path: str = opt("", "LoRA adapter directory (empty: the base model)")
    side_network: str = opt("", "side network (.safetensors from --method side) to run with "
                            "the backbone")
    batch_size: int = opt(16, "sequences per batch")
    max_batches: int = opt(-1, "stop after N batches (-1: all)")
    json_out: str = opt("", "also write the figures to this JSON file")


@dataclass
class BenchArgs:
    """`pocketllm bench accuracy`: the few-shot protocol (pocketllm/protocol.py)."""
    task: str = opt("sst2", "the task (sst2, rte, cb, boolq, copa, trec)")
    k: int = opt(16, "training examples per class")
    seeds: list = opt(["13", "21", "42", "87", "100"], "few-shot sample seeds (the MeZO / "
                      "LM-BFF protocol's five)")
    runs: list = opt(["zero-shot", "zo-sgd", "lora-adam"], "what to compare: LABEL (a method "
                     "name, or zero-shot) or 'LABEL=FLAGS' (the `pocketllm train` flags of "
                     "that run, e.g. 'prge-q4=--method prge --queries 4 --batch-size 2')")
    budget_minutes: float = opt(10.0, "training minutes per run (steps only, one thread)")
    steps_per_eval: int = opt(25, "valid evaluations (and checkpoints) every N steps: the "
                              "best on valid is the adapter scored")
    eval_examples: int = opt(1000, "dev/test examples scored (0: all)")
    max_seq_length: int = opt(256, "truncate examples to this many tokens")
    model: str = opt("smollm2-135m", "model (as for train)")
    data: str = opt("", "the task's folder (default: $POCKETLLM_DATA/<task> or "
                    "../shared/data/<task>)")
    jobs: int = opt(2, "runs at a time, each pinned to its own core when there are enough")
    out: str = opt("runs/accuracy", "output folder (a finished run in it is not run again)")


@dataclass
class GenerateArgs(ModelArgs):
    prompt: str = opt("", "the prompt")
    adapter_path: str = opt("", "LoRA adapter directory (empty: the base model)")
    side_network: str = opt("", "side network (.safetensors from --method side) to run with "
                            "the backbone")
    max_tokens: int = opt(64, "tokens to generate")
    temp: float = opt(0.0, "sampling temperature (0: greedy)")
    chat: bool = opt(False, "wrap the prompt in the tokenizer's chat template")


@dataclass
class FuseArgs(ModelArgs):
    adapter_path: str = opt("adapters", "LoRA adapter to merge")
    save_path: str = opt("fused_model", "where to write the merged HF model directory")


@dataclass
class ReplayArgs(ModelArgs):
    adapter_path: str = opt("adapters", "directory of a zo-sgd/prge run (its zo_log.jsonl)")
    save_path: str = opt("replayed_model", "where to write the rebuilt model / adapter")


@dataclass
class MemoryArgs(ModelArgs):
    method: str = opt("zo-sgd", "what to estimate: inference or a training method (its own "
                      "settings are the flags its section of `pocketllm methods` lists)")
    trainable: str = opt("lora", "which weights train (a method that trains only one kind: "
                         "that one)", choices=lambda: _trainable_sets())
    batch_size: int = opt(8, "sequences per micro-batch")
    max_seq_length: int = opt(256, "tokens per sequence (every sequence assumed this long; a "
                              "causal LM scores every position, a masked LM one <mask> per row)")
    lora_rank: int = opt(8, "LoRA rank r")
    lora_targets: list = opt([], "module names to adapt (default: the query/value projections)")
    measure: bool = opt(False, "also run it in a fresh process and print the measured peak RSS")
    steps: int = opt(1, "--measure: measured steps (first-order methods run one more, "
                     "unmeasured, first: AdamW's state exists from the second step on)")


def _trainable_sets() -> tuple[str, ...]:
    from .trainable import TRAINABLE
    return tuple(TRAINABLE)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_args(parser: argparse.ArgumentParser, *classes: type,
             choices: dict[str, tuple] | None = None) -> None:
    """One flag per field of the dataclasses (a name in several of them once: the same
    setting). Defaults are suppressed so we can tell what was given. `choices`: per field, the
    choice list of a registry the caller knows (e.g. --method)."""
    parser.add_argument("-c", "--config", default=None, help="YAML file of settings")
    seen: set[str] = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                _add_flag(parser, f, hints[f.name], (choices or {}).get(f.name))


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, kind: type,
              choices: tuple | None) -> None:
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif kind is list:
        kw["nargs"] = "+"
    else:
        kw["type"] = kind
        choices = choices or f.metadata.get("choices")
        if callable(choices):  # a registry's names, read when the parser is built
            choices = choices()
        if choices:
            kw["choices"] = choices
    parser.add_argument(flag(f.name), dest=f.name, **kw)


def resolve(cls: type, ns: argparse.Namespace):
    """Defaults < YAML config < command-line flags."""
    return resolve_with(cls, ns)[0]


def resolve_with(cls: type, ns: argparse.Namespace, *extra: type) -> tuple[Any, dict[str, Any]]:
    """`cls` from defaults < YAML config < command-line flags, and the settings given (in the
    YAML or as flags) that belong to the `extra` dataclasses instead (a method's own)."""
    values: dict[str, Any] = {}
    given = vars(ns).copy()
    cfg_path = given.pop("config", None)
    given.pop("command", None)
    if cfg_path:
        values.update(load_yaml(cfg_path, cls, *extra))
    values.update(given)
    own = {f.name for f in dataclasses.fields(cls)}
    return (cls(**{k: v for k, v in values.items() if k in own}),
            {k: v for k, v in values.items() if k not in own})


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default value."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def load_yaml(path: str | os.PathLike, cls: type, *extra: type) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SystemExit(f"{p}: expected a mapping of setting: value")
    hints = {}
    for c in (cls, *extra):
        hints = {**typing.get_type_hints(c), **hints}
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


def read_run_config(path: str | os.PathLike) -> tuple["TrainArgs", dict[str, Any]]:
    """A run's saved config.yaml: its run settings (`TrainArgs`) and the rest (its method's;
    a config written before methods had their own settings lists every method's)."""
    saved = yaml.safe_load(Path(path).read_text()) or {}
    own = {f.name for f in dataclasses.fields(TrainArgs)}
    return (TrainArgs(**{k: v for k, v in saved.items() if k in own}),
            {k: v for k, v in saved.items() if k not in own})


def save_yaml(args: Any, path: str | os.PathLike) -> None:
    """Settings (a dataclass or a dict) as YAML."""
    values = args if isinstance(args, dict) else dataclasses.asdict(args)
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))
