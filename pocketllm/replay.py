"""Rebuild the weights of a zo-sgd or prge run from the base model and its step log alone."""

from __future__ import annotations

from pathlib import Path

from .config import read_run_config
from .models import load_model
from .trainable import setup_trainable
from .zo.log import NAME, ZOLog, replay_log


def replay(run_dir: str | Path, save_path: str | Path, model: str | None = None):
    """Replay `run_dir/zo_log.jsonl` on the base model; save the adapter or the full model.

    Returns (model, number of steps replayed)."""
    run_dir = Path(run_dir)
    cfg_file, log = run_dir / "config.yaml", ZOLog(run_dir)
    if not log.path.is_file() or not cfg_file.is_file():
        raise SystemExit(f"{run_dir}: not a zo-sgd run directory (needs {NAME} and config.yaml)")
    args, _ = read_run_config(cfg_file)
    if model:
        args.model = model
    header, steps = log.read()
    base, _ = load_model(args.model, args.dtype)
    spec, params = setup_trainable(base, args)
    if [n for n, _ in params] != header["params"]:
        raise SystemExit(f"{log.path}: the log's parameters do not match "
                         f"{args.model} with trainable={args.trainable}")
    replay_log(header, steps, params)  # through the optimizer the header names
    out = Path(save_path)
    out.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        spec.save(base, out, base_model=args.model)
    else:
        base.save_pretrained(out)
    return base, len(steps)
