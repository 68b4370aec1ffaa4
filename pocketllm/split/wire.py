"""What the device (client.py) and the server (server.py) agree on besides split.proto: the token's
header, the token file, a side network's config as a SideSpec, and checked decoding of a QTensor.

Both sides import this module; neither imports the other."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from . import split_pb2 as pb
from .quant import dequantize
from .side import SideConfig

TOKEN_HEADER = "authorization"


def read_token(path: str | os.PathLike) -> str:
    """The shared secret in a token file (`--token-file`), both sides' copy of it."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--token-file {p}: no such file")
    token = p.read_text().strip()
    if len(token) < 16:
        raise SystemExit(f"--token-file {p}: the token must be at least 16 characters")
    return token


def spec_to_config(spec: pb.SideSpec) -> SideConfig:
    """The SideConfig a device's Open request describes (the inverse of `config_to_spec`)."""
    return SideConfig(model=spec.model, hidden=spec.hidden, taps=list(spec.taps),
                      width=spec.width, depth=spec.depth, act_bits=spec.act_bits,
                      private_labels=spec.private_labels, learning_rate=spec.learning_rate,
                      weight_decay=spec.weight_decay, seed=spec.seed)


def config_to_spec(cfg: SideConfig) -> pb.SideSpec:
    return pb.SideSpec(**asdict(cfg))


def decode_tensor(t: pb.QTensor, rows: int, cols: int, what: str,
                  bits: tuple[int, ...]) -> torch.Tensor:
    """ValueError naming `what` unless `t` is a well-formed (rows, cols) tensor."""
    if t.rows != rows or t.cols != cols:
        raise ValueError(f"{what}: shape ({t.rows}, {t.cols}), expected ({rows}, {cols})")
    if t.bits not in bits:
        raise ValueError(f"{what}: {t.bits} bits, expected {' or '.join(map(str, bits))}")
    return dequantize(t.data, t.scales, rows, cols, t.bits)
