"""`pocketllm` command line: subcommands only; the work lives in the modules they call."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import config as C

COMMANDS = {
    "train": (C.TrainArgs, "fine-tune a model (zeroth-order or first-order)"),
    "eval": (C.EvalArgs, "loss, perplexity and accuracy on a split, with or without an adapter"),
    "generate": (C.GenerateArgs, "generate text from a prompt"),
    "fuse": (C.FuseArgs, "merge a LoRA adapter into the base model and save an HF directory"),
    "replay": (C.ReplayArgs, "rebuild a zo-sgd run's weights from the base model and its log"),
    "memory": (C.MemoryArgs, "estimate a run's peak memory from the model's config "
                             "(--measure: and measure it)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketllm", description="On-device fine-tuning in about "
                                "the memory of inference.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (cls, help) in COMMANDS.items():
        C.add_args(sub.add_parser(name, help=help, description=help), cls)
    sub.add_parser("methods", help="list the training methods")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "methods":
        from .methods import REGISTRY
        for name, cls in sorted(REGISTRY.items()):
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:12s} {doc}")
        return 0
    cls, _ = COMMANDS[ns.command]
    args = C.resolve(cls, ns)
    from .data import DataError
    from .models import ModelError
    try:
        return globals()["cmd_" + ns.command](args) or 0
    except (DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_train(args: C.TrainArgs) -> int:
    from .train import train
    train(args)
    return 0


def _model_with_adapter(args):
    from .lora import load_adapter
    from .models import load_model
    model, tok = load_model(args.model, args.dtype)
    if args.adapter_path:
        load_adapter(model, args.adapter_path)
    return model, tok


def cmd_eval(args: C.EvalArgs) -> int:
    from .data import encode_all, load_jsonl
    from .evaluate import evaluate, label_choices
    path = Path(args.split)
    if not path.suffix == ".jsonl":
        path = Path(args.data) / f"{args.split}.jsonl"
    records = load_jsonl(path)
    train_file = path.parent / "train.jsonl"
    label_src = load_jsonl(train_file) if train_file.is_file() else records
    model, tok = _model_with_adapter(args)
    enc = encode_all(records, tok, mask_prompt=args.mask_prompt, max_seq_length=args.max_seq_length)
    t0 = time.time()
    r = evaluate(model, enc.items, args.batch_size, tok.pad_token_id, args.max_batches,
                 label_choices(label_src, tok))
    print(f"{path} ({r.records} records, {r.tokens} label tokens, "
          f"{'adapter ' + args.adapter_path if args.adapter_path else 'base model'}): "
          f"{r.line()} | {time.time() - t0:.1f}s")
    return 0


def cmd_generate(args: C.GenerateArgs) -> int:
    from .generate import generate
    model, tok = _model_with_adapter(args)
    print(generate(model, tok, args.prompt, max_tokens=args.max_tokens, temp=args.temp,
                   chat=args.chat, seed=args.seed))
    return 0


def cmd_fuse(args: C.FuseArgs) -> int:
    from .lora import merge_lora
    model, tok = _model_with_adapter(args)
    n = merge_lora(model)
    out = Path(args.save_path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    C.save_yaml(args, out / "pocketllm_config.yaml")
    print(f"merged {n} LoRA layers into {args.model}; saved to {out}")
    return 0


def cmd_replay(args: C.ReplayArgs) -> int:
    from .replay import replay
    t0 = time.time()
    _, n = replay(args.adapter_path, args.save_path)
    print(f"replayed {n} steps of {args.adapter_path} in {time.time() - t0:.1f}s; "
          f"saved to {args.save_path}")
    return 0


def cmd_memory(args: C.MemoryArgs) -> int:
    from .memory_estimate import estimate, framework_mb
    from .models import load_config
    config = load_config(args.model)
    trainable = "full" if args.method == "adam" else "lora" if args.method == "lora-adam" \
        else args.trainable
    try:
        est = estimate(config, args.method, trainable, args.batch_size, args.max_seq_length,
                       args.dtype, args.lora_rank, args.zo_passes, list(args.lora_targets),
                       framework=framework_mb())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = args.method + ("" if args.method == "inference" else f", {trainable}")
    print(f"{args.model} ({args.dtype}), {what}, batch {args.batch_size} x "
          f"{args.max_seq_length} tokens")
    measured = None
    if args.measure:
        from .bench.workload import mode_for, run_in_fresh_process
        r = run_in_fresh_process(mode_for(args.method, trainable), model=args.model,
                                 dtype=args.dtype, batch_size=args.batch_size,
                                 seq=args.max_seq_length, steps=args.steps,
                                 warmup=1 if args.method in ("adam", "lora-adam") else 0,
                                 lora_rank=args.lora_rank, zo_passes=args.zo_passes)
        measured = max(r["peak_run_mb"], r["rss_loaded_mb"])
    print(est.table(measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
