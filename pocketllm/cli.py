"""`pocketllm` command line: subcommands only; the work lives in the modules they call."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import config as C

COMMANDS = {
    "train": (C.TrainArgs, "fine-tune a model (zeroth-order or first-order)"),
    "eval": (C.EvalArgs, "loss, perplexity and accuracy on a split, with or without an adapter"),
    "generate": (C.GenerateArgs, "generate text from a prompt"),
    "fuse": (C.FuseArgs, "merge a LoRA adapter into the base model and save an HF directory"),
    "export": (C.ExportArgs, "write the model with its adapter merged as an ExecuTorch (.pte) "
                             "or ONNX program for inference (generate --engine runs it)"),
    "replay": (C.ReplayArgs, "rebuild a zo-sgd run's weights from the base model and its log"),
    "serve": (C.ServeArgs, "run the split-mode server that trains side networks for devices"),
    "memory": (C.MemoryArgs, "estimate a run's peak memory from the model's config "
                             "(--measure: and measure it)"),
    "bench": (C.BenchArgs, "bench accuracy: the few-shot protocol, every run on the same "
                           "training budget over several seeds (table, CSV, plot)"),
    "federate": (C.FederateArgs, "federated zeroth-order fine-tuning on Flower: simulate N "
                                 "devices, or serve / join a deployment (docs/federated.md)"),
}
# a command's positional action: its choices
ACTIONS = {"bench": ("accuracy",), "federate": ("simulate", "serve", "join")}
# commands that also take every method's own settings (resolved by the method named)
WITH_METHOD_SETTINGS = ("train", "memory", "federate")


class Parser(argparse.ArgumentParser):
    """argparse, its error on one line: `train`'s usage runs to dozens of lines and would bury
    the message naming the flag."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .methods import REGISTRY, setting_classes
    p = Parser(prog="pocketllm", description="On-device fine-tuning in about the memory of "
               "inference.")
    sub = p.add_subparsers(dest="command", required=True)
    methods = tuple(sorted(REGISTRY))
    extra = {name: setting_classes() for name in WITH_METHOD_SETTINGS}
    choices = {"train": {"method": methods}, "memory": {"method": ("inference", *methods)},
               "federate": {"method": methods}}
    for name, (cls, help) in COMMANDS.items():
        parser = sub.add_parser(name, help=help, description=help)
        if name in ACTIONS:  # bench: what to measure; federate: how to run
            parser.add_argument("what", choices=ACTIONS[name])
        C.add_args(parser, cls, *extra.get(name, ()), choices=choices.get(name))
    sub.add_parser("methods", help="list the training methods, their settings and defaults")
    return p


# the commands whose work is torch's: their threads are the fair share (threads.py) unless set
COMPUTES = ("train", "eval", "generate", "fuse", "replay", "export")


def main(argv: list[str] | None = None) -> int:
    # before anything loads torch: OpenMP reads its settings once, when it starts. A caller
    # that loaded torch already (a test, a notebook) keeps its own threads.
    from . import lean_import, threads
    ours = "torch" not in sys.modules
    lean_import.install()  # this process is ours: transformers need not import torchao/scipy
    threads.set_env_defaults()
    ns = build_parser().parse_args(argv)
    if ns.command == "methods":
        from .methods import REGISTRY
        import dataclasses
        for name, cls in sorted(REGISTRY.items()):
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:12s} {doc}")
            flags = [C.flag(f.name) for f in dataclasses.fields(cls.Config)]
            if flags:
                print(f"{'':12s}   settings: {' '.join(flags)}")
            for kind, d in cls.defaults.items():
                trainable, _, objective = kind.partition(":")
                on = f"--trainable {trainable}" + (" on a --task" if objective == "task" else "")
                print(f"{'':12s}   defaults with {on}: " + ", ".join(
                    f"{k.replace('_', '-')} {v:g}" if isinstance(v, float) else
                    f"{k.replace('_', '-')} {v}" for k, v in d.items()))
            if cls.defaults_from:
                print(f"{'':12s}   defaults from: {cls.defaults_from}")
        return 0
    cls, _ = COMMANDS[ns.command]
    what = vars(ns).pop("what", None)  # the positional action (ACTIONS)
    from .data import DataError
    from .finite import NonFiniteError
    from .methods import setting_classes
    from .models import ModelError
    try:
        # defaults < YAML < flags, every number in its range, before anything loads; train's
        # and memory's flags are their own and the methods' settings: they resolve both
        methods = ns.command in WITH_METHOD_SETTINGS
        args, rest = C.resolve_with(cls, ns, *(setting_classes() if methods else ()))
        from .memory import tune_allocator
        tune_allocator()  # before any tensor exists: no page-fault churn on activations
        if ns.command in COMPUTES:
            threads.configure(getattr(args, "threads", 0), auto=ours,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
        cmd = globals()["cmd_" + ns.command]
        if ns.command == "federate":
            return cmd(args, rest, what) or 0
        return (cmd(args, rest) if methods else cmd(args)) or 0
    except (C.SettingError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # the run diverged: nothing non-finite was saved
        print(f"error: {e}", file=sys.stderr)
        return 1


def cmd_train(args: C.TrainArgs, given: dict) -> int:
    from .methods import settings_for
    from .train import train
    train(args, settings_for(args.method, given))
    return 0


def _model_with_adapter(args, with_spec: bool = False):
    """The model with the trained set saved in --adapter-path (whichever kind: LoRA, norm,
    prefix), and a side network if given; `with_spec`: also the set's spec (None: none)."""
    from .models import load_model
    from .trainable import load_saved
    model, tok = load_model(args.model, args.dtype, getattr(args, "quantize_base", "none"))
    spec = None
    if args.adapter_path:
        try:
            spec = load_saved(model, args.adapter_path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --adapter-path {args.adapter_path}: {e}") from None
    if getattr(args, "side_network", ""):
        from .split.side import attach_side
        try:
            attach_side(model, args.side_network)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --side-network {args.side_network}: {e}") from None
    return (model, tok, spec) if with_spec else (model, tok)


def cmd_eval(args: C.EvalArgs) -> int:
    from .data.source import load_run_data
    from .evaluate import evaluate
    from .loss import is_masked_lm
    if args.task:
        # a task's split: test = its dev set (up to --eval-examples), train/valid = the
        # few-shot sample of --k per class with --seed
        data = load_run_data(args, splits=(args.split,), required=())
        where = f"task {args.task} {args.split}"
    else:
        from .data import load_jsonl
        from .data.source import RunData
        path = Path(args.split)
        if path.suffix != ".jsonl":
            path = Path(args.data_dir()) / f"{args.split}.jsonl"
        train_file = path.parent / "train.jsonl"
        splits = {"test": load_jsonl(path)}
        if train_file.is_file() and train_file != path:
            splits["train"] = load_jsonl(train_file)  # the label set comes from train
        data, where = RunData(splits, str(path.parent)), str(path)
    model, tok = _model_with_adapter(args)
    key = args.split if args.task else "test"
    enc = data.encode(tok, is_masked_lm(model), args.max_seq_length, args.mask_prompt)
    for w in data.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if key not in enc:
        raise SystemExit(f"{where}: no examples to score")
    t0 = time.time()
    r = evaluate(model, enc[key].items, args.batch_size, tok.pad_token_id, args.max_batches,
                 data.label_choices(tok))
    print(f"{where} ({r.records} records, "
          f"{_what(args)}): "
          f"{r.line()} | {time.time() - t0:.1f}s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r.__dict__, indent=2))
    return 0


def _what(args) -> str:
    parts = [f"adapter {args.adapter_path}"] if args.adapter_path else []
    parts += [f"side network {args.side_network}"] if args.side_network else []
    return ", ".join(parts) or "base model"


def cmd_serve(args: C.ServeArgs) -> int:
    from .split.server import serve
    return serve(args)


def cmd_bench(args: C.BenchArgs) -> int:
    from .protocol import accuracy
    return accuracy(args)


def cmd_federate(args: C.FederateArgs, given: dict, action: str) -> int:
    from .federated import cli
    return cli.run(action, args, given)


def cmd_generate(args: C.GenerateArgs) -> int:
    if args.engine != "torch" or args.program:  # an exported program: model and adapter in it
        from .export import generate_from_program
        if args.adapter_path or args.side_network or args.quantize_base != "none":
            raise SystemExit("error: --program holds its model and adapter: drop "
                             "--adapter-path / --side-network / --quantize-base")
        text, cut = generate_from_program(args.engine, args.program, args.prompt,
                                          args.max_tokens, args.temp, args.chat, args.seed)
        print(text)
        if cut:
            print("(stopped at the program's --max-len)", file=sys.stderr)
        return 0
    from .generate import generate
    model, tok = _model_with_adapter(args)
    print(generate(model, tok, args.prompt, max_tokens=args.max_tokens, temp=args.temp,
                   chat=args.chat, seed=args.seed))
    return 0


def cmd_export(args: C.ExportArgs) -> int:
    from .export import FORMATS, export
    t0 = time.time()
    if args.trainable:  # the training step as a program (selftrain.py)
        from .selftrain import export_trainable
        out = export_trainable(args)
        print(f"wrote {out}/ ({args.format} step program, manifest.json, batches, state) in "
              f"{time.time() - t0:.0f}s; run it: python examples/host/train_{args.format}.py "
              f"{out} RUN_DIR, then pocketllm replay --adapter-path RUN_DIR")
        return 0
    out = export(args)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.format}, max length "
          f"{args.max_len}) in {time.time() - t0:.0f}s; run it: pocketllm generate --engine "
          f"{FORMATS[args.format].engine} --program {out} --prompt ...")
    return 0


def cmd_fuse(args: C.FuseArgs) -> int:
    model, tok, spec = _model_with_adapter(args, with_spec=True)
    n = spec.merge(model) if spec is not None else 0
    out = Path(args.save_path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    C.save_yaml(args, out / "pocketllm_config.yaml")
    print(f"merged {n} {getattr(spec, 'kind', 'LoRA')} layers into {args.model}; saved to {out}")
    return 0


def cmd_replay(args: C.ReplayArgs) -> int:
    from .replay import replay
    t0 = time.time()
    _, n = replay(args.adapter_path, args.save_path)
    print(f"replayed {n} steps of {args.adapter_path} in {time.time() - t0:.1f}s; "
          f"saved to {args.save_path}")
    return 0


def cmd_memory(args: C.MemoryArgs, given: dict) -> int:
    from .memory_estimate import Inference, estimate, framework_mb
    from .methods import REGISTRY, settings_for
    from .models import load_config
    # inference is the memory command's yardstick, not a method; the rest are the registry's
    cls = {Inference.name: Inference, **REGISTRY}[args.method]
    settings = settings_for(args.method, given) if args.method in REGISTRY else {}
    if given and args.method not in REGISTRY:
        raise SystemExit(f"--method {args.method} has no settings: "
                         f"{' '.join(C.flag(k) for k in given)}")
    # the trainable set the method trains: --trainable where it fits, else the method's own
    kinds = cls.trainable_kinds
    trainable = args.trainable if args.trainable in kinds else kinds[0]
    config = load_config(args.model)
    try:
        est = estimate(config, cls, trainable, args.batch_size, args.max_seq_length,
                       args.dtype, args.lora_rank, list(args.lora_targets),
                       framework=framework_mb(), lora_layers=args.lora_layers,
                       quantize=args.quantize_base, **settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = args.method + (f", {trainable}" if cls.trains_model else "")
    quant = f", base {args.quantize_base}" if args.quantize_base != "none" else ""
    print(f"{args.model} ({args.dtype}{quant}), {what}, batch {args.batch_size} x "
          f"{args.max_seq_length} tokens")
    measured = None
    if args.measure:  # the same method and settings, in a process of its own
        from .memory import run_in_fresh_process
        try:
            r = run_in_fresh_process(args.method, trainable=trainable, model=args.model,
                                     dtype=args.dtype, batch_size=args.batch_size,
                                     seq=args.max_seq_length, steps=args.steps,
                                     warmup=est.warmup, lora_rank=args.lora_rank,
                                     lora_layers=args.lora_layers,
                                     quantize_base=args.quantize_base, **settings)
        except RuntimeError as e:
            print(f"error: --measure: {e}", file=sys.stderr)
            return 2
        measured = max(r["peak_run_mb"], r["rss_loaded_mb"])
    print(est.table(measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
