"""Rebuild the weights of a zo-sgd or prge run from the base model and its step log alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from .config import TrainArgs
from .lora import save_adapter
from .models import load_model
from .trainable import setup_trainable
from .zo import optim
from .zo.log import LOG_DEFAULTS, LOG_NAME, read_log, replay_steps


def replay(run_dir: str | Path, save_path: str | Path, model: str | None = None):
    """Replay `run_dir/zo_log.jsonl` on the base model; save the adapter or the full model.

    Returns (model, number of steps replayed)."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not (run_dir / LOG_NAME).is_file() or not cfg_file.is_file():
        raise SystemExit(f"{run_dir}: not a zo-sgd run directory (needs {LOG_NAME} and config.yaml)")
    saved = yaml.safe_load(cfg_file.read_text())  # the run's and its method's settings
    args = TrainArgs(**{f.name: saved[f.name] for f in dataclasses.fields(TrainArgs)
                        if f.name in saved})
    if model:
        args.model = model
    header, steps = read_log(run_dir / LOG_NAME)
    base, _ = load_model(args.model, args.dtype)
    spec, params = setup_trainable(base, args)
    if [n for n, _ in params] != header["params"]:
        raise SystemExit(f"{run_dir / LOG_NAME}: the log's parameters do not match "
                         f"{args.model} with trainable={args.trainable}")
    opt = optim.build(header.get("optimizer", LOG_DEFAULTS["optimizer"]), [p for _, p in params])
    replay_steps(params, steps, header["seed"], header["dist"], opt)
    out = Path(save_path)
    out.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        save_adapter(base, out, spec, base_model=args.model)
    else:
        base.save_pretrained(out)
    return base, len(steps)
