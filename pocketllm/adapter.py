"""The saved form of every trainable set but `full`: a directory holding a small JSON config
that names the kind (`adapter_config.json`) and the trained tensors (`adapter_model.safetensors`),
both written atomically. LoRA and prompt tuning write PEFT's own configs (`peft_type` names the
kind, and peft loads them); a set PEFT has no format for names itself in `pocketllm_trainable`.

Which kinds there are, and how each rebuilds itself on a model, is `pocketllm.trainable`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KIND_KEY = "pocketllm_trainable"  # the kind of a config PEFT has no peft_type for


def atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then rename over `dest`: a kill at any moment leaves the old file or the
    new one, never a torn one."""
    tmp = dest.with_name(dest.name + ".tmp")
    write(tmp)
    os.replace(tmp, dest)


def write(path: str | os.PathLike, weights: dict[str, torch.Tensor], config: dict,
          metadata: dict[str, str] | None = None) -> Path:
    """Write `config` and `weights` into directory `path` (made if missing); `metadata` goes
    into the safetensors header, in the same atomic write as the weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / ADAPTER_WEIGHTS, lambda p: save_file(weights, str(p), metadata=metadata))
    atomic_write(path / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))
    return path


def read_config(path: str | os.PathLike) -> dict:
    """The adapter config in directory `path`; a clear error if there is none."""
    cfg_file = Path(path) / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no adapter at {path}: {ADAPTER_CONFIG} is missing")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_file}: not JSON ({e})") from None


def load_into(path: str | os.PathLike, targets: dict[str, torch.Tensor]) -> None:
    """Copy the saved tensors of `path` into `targets` (saved key -> the model's tensor); the
    keys must match exactly, else a ValueError naming what is missing and what is extra."""
    sd = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    missing, unexpected = set(targets) - set(sd), set(sd) - set(targets)
    if missing or unexpected:
        raise ValueError(f"adapter at {path} does not fit this model: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for key, t in targets.items():
            if sd[key].shape != t.shape:
                raise ValueError(f"adapter at {path}: {key} has shape {tuple(sd[key].shape)}, "
                                 f"this model's {tuple(t.shape)}")
            t.copy_(sd[key])
