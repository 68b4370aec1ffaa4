"""Run settings: one dataclass per subcommand whose fields carry their help.

The CLI flags are generated from the fields (`--learning-rate` for `learning_rate`); a YAML file
given with `-c` uses the same names (either spelling), and flags given on the command line
override it. The resolved settings are written beside every output (`config.yaml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .schedules import SHAPES

# what --time-budget counts (train.CLOCKS measures each): wall seconds or this process's CPU time
BUDGET_CLOCKS = ("wall", "cpu")
THREADS_HELP = ("torch threads (0: a fair share of the cores beside other CPU-bound jobs, chosen "
                "again as the load changes; README: Running two jobs side by side)")


class SettingError(SystemExit):
    """A setting refused (a flag, a YAML value): its message names the flag (and the file).
    `pocketllm` prints it as one line and exits 2, as argparse does; anywhere else it ends the
    program with its message like any SystemExit."""


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take: finite, and >= ge / > gt, <= le / < lt where
    given, or one of `also` (a sentinel outside the range, e.g. -1 for "all")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()

    def describe(self, kind: type) -> str:
        """What the setting must be, e.g. 'a finite number > 0', 'an integer in [0, 65535]'."""
        # (operator, interval bracket, bound) of each side that has one
        lo = next((b for b in ((">=", "[", self.ge), (">", "(", self.gt)) if b[2] is not None),
                  None)
        hi = next((b for b in (("<=", "]", self.le), ("<", ")", self.lt)) if b[2] is not None),
                  None)
        if lo and hi:
            where = f" in {lo[1]}{_num(lo[2])}, {_num(hi[2])}{hi[1]}"
        elif lo or hi:
            op, _, bound = lo or hi
            where = f" {op} {_num(bound)}"
        else:
            where = ""
        also = f" (or {', '.join(_num(a) for a in self.also)})" if self.also else ""
        return ("an integer" if kind is int else "a finite number") + where + also

    def admits(self, value: float) -> bool:
        if value in self.also:
            return True
        return (math.isfinite(value)
                and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def opt(default: Any, help: str, choices: tuple | None = None, *, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None,
        also: tuple = (), **kw) -> Any:
    """A setting: its default, help and, for a number (or a list of numbers), its range
    (`Bounds`: ge/gt/le/lt, `also` for sentinels such as -1). Every number must be finite; the
    range is checked on the flag, on a YAML value and by `check`, before anything loads."""
    bounded = any(b is not None for b in (ge, gt, le, lt)) or also
    meta = {"help": help, "choices": choices,
            "bounds": Bounds(ge, gt, le, lt, tuple(also)) if bounded else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def numeric_kind(kind: Any) -> type | None:
    """int or float for a numeric setting's type hint (or a list of numbers'), else None."""
    if typing.get_origin(kind) is list:
        kind = (typing.get_args(kind) or (None,))[0]
    return kind if kind in (int, float) else None


def to_number(f: dataclasses.Field, kind: type, value: Any) -> int | float:
    """`value` (a flag's text, a YAML value) as setting `f` of type `kind` (int or float),
    within its bounds; else ValueError saying what it must be."""
    bounds = f.metadata.get("bounds") or Bounds()  # no range declared: finite still
    must = f"must be {bounds.describe(kind)}"
    given = value
    try:
        if isinstance(value, str):
            value = kind(value.strip())
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # YAML's 1 for 1.0
    except (ValueError, OverflowError):
        value = None
    if type(value) is not kind or not bounds.admits(value):  # (bool is no int here)
        shown = given if isinstance(given, str) and given.strip() else repr(given)
        raise ValueError(f"{must}, got {shown}")
    return value


def check(settings: Any) -> None:
    """SettingError naming the flag of the first numeric field of dataclass `settings` out of
    its range (settings built in code rather than parsed, e.g. `train(TrainArgs(...))`)."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        kind, value = numeric_kind(hints[f.name]), getattr(settings, f.name)
        if kind is None:
            continue
        try:
            for v in value if isinstance(value, list) else [value]:
                to_number(f, kind, v)
        except ValueError as e:
            raise SettingError(f"{flag(f.name)} {e}") from None


SEED_MAX = 2**32 - 1  # a 32-bit seed, what every seeded library takes
MAX_THREADS = 1024    # more is a typo (torch crashes on 100000)


@dataclass
class ModelArgs:
    model: str = opt("smollm2-135m", "model: alias (smollm2-135m, tiny-llama, tiny-gpt2, "
                     "tiny-opt, tiny-gemma, tiny-roberta; random-weight shapes random:opt-1.3b, "
                     "random:roberta-large, random:smollm2-135m), local HF directory, .gguf "
                     "file, or hub id")
    dtype: str = opt("float32", "weights' dtype", choices=("float32", "bfloat16"))
    seed: int = opt(0, "random seed: data order, LoRA init and perturbations", ge=0,
                    le=SEED_MAX)


@dataclass
class QuantArgs:
    quantize_base: str = opt("none", "store the frozen base's Linear weights quantized, and "
                             "its embedding table (tied head) as int8 rows (the trained set "
                             "stays float): int8, int8-dynamic, int4; zeroth-order "
                             "methods and split mode only (docs/quantization.md)",
                             choices=lambda: _quant_schemes())


@dataclass
class DataArgs:
    data: str = opt("", "directory with train.jsonl / valid.jsonl / test.jsonl (default: "
                    "examples/personal), or a task's folder (default with --task: "
                    "$POCKETLLM_DATA/<task> or ../shared/data/<task>)")
    max_seq_length: int = opt(256, "truncate records to this many tokens", ge=2)
    mask_prompt: bool = opt(True, "train on the completion only (prompt/completion, messages)")
    task: str = opt("", "prompt-based task instead of .jsonl records: sst2, rte, cb, boolq, "
                    "copa, trec, or custom (with --template and --label-words)")
    k: int = opt(16, "task: training examples per class, sampled with --seed (0: all); a "
                 "validation split of k per class is drawn the same way", ge=0)
    eval_examples: int = opt(1000, "task: cap on the dev/test examples scored (0: all)", ge=0)
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
class TrainArgs(ModelArgs, DataArgs, QuantArgs):
    method: str = opt("zo-sgd", "training method (see `pocketllm methods`); its own settings "
                      "are the flags its section of `pocketllm methods` lists")
    trainable: str = opt("lora", "which weights to train", choices=lambda: _trainable_sets())
    lora_rank: int = opt(8, "LoRA rank r", ge=1)
    lora_alpha: float = opt(16.0, "LoRA alpha (scaling = alpha / r)", gt=0)
    lora_dropout: float = opt(0.0, "LoRA dropout (first-order methods only)", ge=0, lt=1)
    lora_targets: list = opt([], "module names to adapt (default: the query/value projections)")
    lora_layers: str = opt("", "LoRA on these layers only: N (the last N), or indices and "
                           "start:stop ranges, e.g. 0,11 or 8: (empty: every layer); fewer "
                           "perturbed coordinates for zeroth-order")
    norm_layers: str = opt("", "--trainable norm: the final norm plus these layers' norms "
                           "only: N (the last N; 0: the final norm alone), or indices and "
                           "start:stop ranges (empty: every norm)")
    head_tokens: str = opt("", "--trainable head: the token ids whose output-head rows train, "
                           "comma-separated (empty: every token the training split scores)")
    num_virtual_tokens: int = opt(8, "--trainable prefix: learned virtual tokens before every "
                                  "input (prompt tuning)", ge=1)
    iters: int = opt(200, "training steps", ge=1)
    batch_size: int = opt(8, "sequences per micro-batch", ge=1)
    grad_accumulation: int = opt(1, "micro-batches per step (ZO: the same perturbation for all)",
                                 ge=1)
    learning_rate: float = opt(0.0, "learning rate (0: the method's default for --trainable, "
                               "`pocketllm methods` lists them)", ge=0)
    lora_fa: bool = opt(False, "LoRA-FA: A stays frozen at its random init, only B is trained")
    lr_schedule: str = opt("auto", "learning-rate schedule (to --lr-final); auto: the method's "
                           "default (linear for ZO LoRA on a task, constant otherwise)",
                           choices=lambda: ("auto", *SHAPES))
    lr_final: float = opt(0.0, "final learning rate of a linear/cosine schedule", ge=0)
    lr_warmup: int = opt(0, "steps of linear learning-rate warmup from 0", ge=0)
    adapter_path: str = opt("adapters", "output directory (adapter, logs, config)")
    time_budget: float = opt(0.0, "stop after this many minutes of training (steps only, "
                             "evaluation excluded; the whole run's, across --resume; 0: "
                             "--iters alone); the lr / eps schedules end with the budget where it "
                             "stops the run first", ge=0)
    budget_clock: str = opt("wall", "what --time-budget and the step times count: wall "
                            "(seconds on the clock) or cpu (this process's CPU seconds: on a "
                            "machine shared with other jobs, the time the steps would take on "
                            "a core of their own when running on one thread)",
                            choices=BUDGET_CLOCKS)
    resume: bool = opt(False, "continue the run in --adapter-path exactly where it stopped")
    save_every: int = opt(100, "save the adapter / checkpoint every N steps (0: only at the end)",
                          ge=0)
    steps_per_eval: int = opt(50, "evaluate on valid every N steps (0: only before and after)",
                              ge=0)
    keep_best: Optional[bool] = opt(None, "also keep the adapter that scored best on valid "
                                    "(accuracy for a task, else loss) at any evaluation, in "
                                    "ADAPTER_PATH/best/ (default: on for a small trainable set "
                                    "whose method trains it here, where runs that peak and fall "
                                    "are common; off for --trainable full and split mode)")
    steps_per_report: int = opt(10, "print a report line every N steps", ge=1)
    eval_before: bool = opt(True, "evaluate before training (the zero-shot figure for a task)")
    test_every: int = opt(0, "task: score the dev/test set every N steps (0: only before and "
                          "after); logged as test_accuracy with the wall-clock time", ge=0)
    val_batches: int = opt(-1, "validation batches per evaluation (-1: the whole split)",
                           ge=1, also=(-1,))
    eval_batch_size: int = opt(16, "sequences per evaluation batch", ge=1)
    threads: int = opt(0, THREADS_HELP, ge=0, le=MAX_THREADS)


@dataclass
class ServeArgs:
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(50051, "port (0: any free port, see --port-file)", ge=0, le=65535)
    token_file: str = opt("", "file holding the access token clients must present")
    tls_cert: str = opt("", "PEM certificate chain for TLS (with --tls-key)")
    tls_key: str = opt("", "PEM private key for TLS")
    state_dir: str = opt("split_state", "where sessions are checkpointed (and resumed from)")
    models: list = opt([], "public models whose output heads sessions may train against "
                       "(default: the built-in aliases)")
    max_message_mb: int = opt(64, "largest message accepted or sent, MiB", ge=1,
                              le=2047)  # gRPC's limit is a signed 32-bit byte count
    # availability limits (server.limit_lines prints them at start-up)
    max_streams: int = opt(16, "Train streams served at once; one more is refused with "
                           "RESOURCE_EXHAUSTED and a retry-after (devices retry)", ge=1,
                           le=MAX_THREADS)
    workers: int = opt(8, "worker threads for Health, Open, Fetch and Delete, besides the "
                       "--max-streams threads that Train streams hold", ge=1, le=MAX_THREADS)
    stream_idle_s: float = opt(120.0, "close a Train stream that sends no message for this "
                               "long (frees its slot for another device)", gt=0)
    session_lease_s: float = opt(60.0, "a session whose stream sent nothing for this long (a "
                                 "frozen device, a half-open connection) goes to the next "
                                 "stream that asks for it: the device's reconnect or --resume",
                                 gt=0)
    keepalive_s: float = opt(30.0, "ping a connection quiet for this long; one that does not "
                             "answer within as long again (a dead or frozen peer) is closed",
                             gt=0)
    shutdown_grace_s: float = opt(5.0, "on SIGTERM/SIGINT, streams get this long to finish "
                                  "before they are cancelled", ge=0)
    threads: int = opt(0, "torch threads (0: torch's default)", ge=0, le=MAX_THREADS)
    port_file: str = opt("", "write the bound port here once listening")
    # resource limits (README "Split server limits"; server.LIMITS, printed at start-up)
    max_side_params: int = opt(8_000_000, "limit: side-network parameters per session (taps x "
                               "width x depth; a larger one is refused at Open)", ge=1)
    max_step_mb: int = opt(512, "limit: server memory one training step may take, MiB, "
                           "estimated from its rows, taps and candidates before it is read", ge=1)
    max_sessions: int = opt(256, "limit: sessions on the server, all tokens together (each "
                            "checkpointed in --state-dir until deleted)", ge=1)
    max_sessions_per_token: int = opt(64, "limit: sessions one token may hold (--token-file "
                                      "may list several tokens, one per line)", ge=1)
    max_resident_sessions: int = opt(32, "limit: sessions held in memory (>= --max-streams + "
                                     "--workers: each may hold one in use); the "
                                     "least recently used idle one is evicted to its checkpoint "
                                     "and reloaded when next used", ge=1)


@dataclass
class EvalArgs(ModelArgs, DataArgs, QuantArgs):
    split: str = opt("test", "which split of --data to score (or a path to a .jsonl file)")
    adapter_path: str = opt("", "LoRA adapter directory (empty: the base model)")
    side_network: str = opt("", "side network (.safetensors from --method side) to run with "
                            "the backbone")
    batch_size: int = opt(16, "sequences per batch", ge=1)
    max_batches: int = opt(-1, "stop after N batches (-1: all)", ge=1, also=(-1,))
    json_out: str = opt("", "also write the figures to this JSON file")
    threads: int = opt(0, THREADS_HELP, ge=0, le=MAX_THREADS)


@dataclass
class BenchArgs:
    """`pocketllm bench accuracy`: the few-shot protocol (pocketllm/protocol.py)."""
    task: str = opt("sst2", "the task (sst2, rte, cb, boolq, copa, trec)")
    k: int = opt(16, "training examples per class", ge=1)
    seeds: list[int] = opt([13, 21, 42, 87, 100], "few-shot sample seeds (the MeZO / "
                           "LM-BFF protocol's five)", ge=0, le=SEED_MAX)
    runs: list = opt(["zero-shot", "zo-sgd", "lora-adam"], "what to compare: LABEL (a method "
                     "name, or zero-shot) or 'LABEL=FLAGS' (the `pocketllm train` flags of "
                     "that run, e.g. 'prge-q4=--method prge --queries 4 --batch-size 2')")
    budget_minutes: float = opt(10.0, "training minutes per run (steps only, one thread)",
                                gt=0)
    budget_clock: str = opt("wall", "what the budget counts (train --budget-clock): wall, or "
                            "cpu seconds when other jobs share the machine",
                            choices=BUDGET_CLOCKS)
    steps_per_eval: int = opt(25, "valid evaluations (and checkpoints) every N steps: the "
                              "best on valid is the adapter scored", ge=1)
    eval_examples: int = opt(1000, "dev/test examples scored (0: all)", ge=0)
    max_seq_length: int = opt(256, "truncate examples to this many tokens", ge=2)
    model: str = opt("smollm2-135m", "model (as for train)")
    data: str = opt("", "the task's folder (default: $POCKETLLM_DATA/<task> or "
                    "../shared/data/<task>)")
    jobs: int = opt(2, "runs at a time, each pinned to its own core when there are enough",
                    ge=1)
    out: str = opt("runs/accuracy", "output folder (a finished run in it is not run again)")


@dataclass
class GenerateArgs(ModelArgs, QuantArgs):
    prompt: str = opt("", "the prompt")
    adapter_path: str = opt("", "LoRA adapter directory (empty: the base model)")
    side_network: str = opt("", "side network (.safetensors from --method side) to run with "
                            "the backbone")
    max_tokens: int = opt(64, "tokens to generate", ge=1)
    temp: float = opt(0.0, "sampling temperature (0: greedy)", ge=0)
    chat: bool = opt(False, "wrap the prompt in the tokenizer's chat template")
    engine: str = opt("torch", "what runs the model: torch (the model and --adapter-path), or "
                      "the runtime of an exported --program (pocketllm export)",
                      choices=lambda: ("torch", *_program_engines()))
    program: str = opt("", "--engine executorch / onnxruntime: the .pte / .onnx file "
                       "`pocketllm export` wrote (the model and adapter are in it)")


@dataclass
class ExportArgs(ModelArgs):
    format: str = opt("pte", "pte: an ExecuTorch program (XNNPACK); onnx: an ONNX model",
                      choices=lambda: _export_formats())
    adapter_path: str = opt("", "the trained set to merge (LoRA, norm; empty: the base model)")
    out: str = opt("", "the file to write (default model.pte / model.onnx), with FILE.json "
                   "beside it")
    max_len: int = opt(256, "the program's fixed length: prompt plus generated tokens (no KV "
                       "cache: every token recomputes the prefix)", ge=2)
    trainable: str = opt("", "a zeroth-order run's settings (YAML, as train -c reads; or a "
                         "run's config.yaml): write the whole training step as one program "
                         "that trains itself, with its manifest, batches and initial state, "
                         "to the folder --out (docs/engines.md; examples/host/ runs it)")
    steps: int = opt(0, "--trainable: the training batches written (0: the run's iters)", ge=0)


@dataclass
class FuseArgs(ModelArgs):
    adapter_path: str = opt("adapters", "LoRA adapter to merge")
    save_path: str = opt("fused_model", "where to write the merged HF model directory")


@dataclass
class ReplayArgs(ModelArgs):
    adapter_path: str = opt("adapters", "directory of a zo-sgd/prge run (its zo_log.jsonl)")
    save_path: str = opt("replayed_model", "where to write the rebuilt model / adapter")


@dataclass
class MemoryArgs(ModelArgs, QuantArgs):
    method: str = opt("zo-sgd", "what to estimate: inference or a training method (its own "
                      "settings are the flags its section of `pocketllm methods` lists)")
    trainable: str = opt("lora", "which weights train (a method that trains only one kind: "
                         "that one)", choices=lambda: _trainable_sets())
    batch_size: int = opt(8, "sequences per micro-batch", ge=1)
    max_seq_length: int = opt(256, "tokens per sequence (every sequence assumed this long; a "
                              "causal LM scores every position, a masked LM one <mask> per row)",
                              ge=2)
    lora_rank: int = opt(8, "LoRA rank r", ge=1)
    lora_targets: list = opt([], "module names to adapt (default: the query/value projections)")
    lora_layers: str = opt("", "LoRA on these layers only, as for train (empty: every layer)")
    measure: bool = opt(False, "also run it in a fresh process and print the measured peak RSS")
    steps: int = opt(1, "--measure: measured steps (first-order methods run one more, "
                     "unmeasured, first: AdamW's state exists from the second step on)", ge=1)


def _export_formats() -> tuple[str, ...]:
    from .export import FORMATS
    return tuple(FORMATS)


def _program_engines() -> tuple[str, ...]:
    from .export import ENGINES
    return tuple(ENGINES)


def _quant_schemes() -> tuple[str, ...]:
    from .quantize import SCHEMES
    return tuple(SCHEMES)


@dataclass
class FederateArgs(TrainArgs):
    """`pocketllm federate simulate|serve|join`: federated zeroth-order fine-tuning on Flower
    (pocketllm/federated, docs/federated.md). --iters counts rounds; --adapter-path holds the
    federation's log and the shared model rebuilt from it."""
    method: str = opt("prge", "zeroth-order method every device runs (zo-sgd, prge); its "
                      "--queries are the seeds of a round")
    adapter_path: str = opt("federation", "output directory: the federation log "
                            "(fed_log.jsonl, resumed if present) and the adapter rebuilt from it")
    clients: int = opt(10, "devices: simulated ones (simulate), or how many partitions of "
                       "--data the joining devices split (join)", ge=1, le=100_000)
    partition: str = opt("iid", "how --data's training examples are split among the devices: "
                         "iid or dirichlet:ALPHA (non-IID over labels)")
    partition_id: int = opt(0, "join: this device's partition of --data (0..--clients-1)", ge=0)
    clients_per_round: int = opt(0, "devices asked each round (0: all connected)", ge=0)
    seed_pool: int = opt(4096, "candidate seeds a round's seeds are drawn from (a device may "
                         "precompute their z)", ge=1, le=2**31 - 1)
    aggregate: str = opt("pooled", "how the devices' replies become a round's coefficients "
                         "(federated/aggregate.py): pooled (they send their losses; the "
                         "estimator applied once to the union's: pooled training's step), or "
                         "per query over their own estimates: mean, median, trimmed "
                         "(tolerate outliers)", choices=lambda: _aggregates())
    trim: float = opt(0.1, "--aggregate trimmed: fraction dropped at each end", ge=0, lt=0.5)
    grad_bound: float = opt(1e3, "a device's projected gradient (--aggregate pooled: loss) "
                            "beyond this magnitude excludes its reply from the round", gt=0)
    round_timeout: float = opt(600.0, "seconds the server waits for a round's replies (the "
                               "late ones are left out of that round)", gt=0)
    sim_cpus: int = opt(1, "simulate: CPUs Ray may use; one simulated device runs on each "
                        "at a time (each such worker loads the model once)", ge=1, le=1024)
    address: str = opt("127.0.0.1:9092", "serve: HOST:PORT where the superlink listens (its "
                       "Fleet and Control HTTP APIs); join: the superlink to connect to")


def _aggregates() -> tuple[str, ...]:
    from .federated.aggregate import REGISTRY
    return tuple(REGISTRY)


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


class _Number:
    """A numeric flag's argparse `type`: its text as a number within the field's range, else
    argparse's one-line refusal naming the flag ("argument --iters: must be ...")."""

    def __init__(self, f: dataclasses.Field, kind: type):
        self.field, self.kind = f, kind

    def __call__(self, text: str) -> int | float:
        try:
            return to_number(self.field, self.kind, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, kind: type,
              choices: tuple | None) -> None:
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
    number = numeric_kind(kind)
    if kind in (bool, Optional[bool]):  # Optional: None = the run decides (see its help)
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is list or kind is list:
        kw["nargs"] = "+"
        if number:
            kw["type"] = _Number(f, number)
    else:
        kw["type"] = _Number(f, number) if number else kind
        choices = choices or f.metadata.get("choices")
        if callable(choices):  # a registry's names, read when the parser is built
            choices = choices()
        if choices:
            kw["choices"] = choices
    parser.add_argument(flag(f.name), dest=f.name, **kw)


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
        raise SettingError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SettingError(f"{p}: expected a mapping of setting: value")
    hints, fields = {}, {}
    for c in (cls, *extra):  # a name in several classes: the first one's (as add_args)
        hints = {**typing.get_type_hints(c), **hints}
        fields = {**{f.name: f for f in dataclasses.fields(c)}, **fields}
    out = {}
    for k, v in raw.items():
        name = str(k).replace("-", "_")
        if name not in hints:
            raise SettingError(f"{p}: unknown setting {k!r}; valid: "
                               f"{', '.join(sorted(h.replace('_', '-') for h in hints))}")
        kind, number = hints[name], numeric_kind(hints[name])
        base = typing.get_origin(kind) or kind
        if base is typing.Union:  # Optional[bool] (--keep-best): the type it holds
            base = next(a for a in typing.get_args(kind) if a is not type(None))
        if base is list and not isinstance(v, list):
            v = [v]
        if number:  # YAML reads 1e-3 as a string, .nan as a float: one check for all
            try:
                v = [to_number(fields[name], number, x) for x in v] if base is list else \
                    to_number(fields[name], number, v)
            except ValueError as e:
                raise SettingError(f"{p}: setting {k!r} ({flag(name)}) {e}") from None
        elif not isinstance(v, base):
            raise SettingError(f"{p}: setting {k!r}: expected {base.__name__}, got {v!r}")
        choices = fields[name].metadata.get("choices")
        choices = choices() if callable(choices) else choices
        if choices and v not in choices:  # as argparse checks a flag's
            raise SettingError(f"{p}: setting {k!r} ({flag(name)}) must be one of "
                               f"{', '.join(map(str, choices))}, got {v!r}")
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
