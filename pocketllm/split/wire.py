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


def read_tokens(path: str | os.PathLike) -> list[str]:
    """The tokens in a token file (`--token-file`): one per line, `#` comments and blank lines
    skipped. The server's file may list several (one per device owner: each owns the sessions
    it opens, and counts against `--max-sessions-per-token`); a device's holds its own one."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--token-file {p}: no such file")
    tokens = [t.strip() for t in p.read_text().splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise SystemExit(f"--token-file {p}: no token in it")
    for i, t in enumerate(tokens):
        if len(t) < 16:
            raise SystemExit(f"--token-file {p}: token {i + 1} is shorter than 16 characters")
    return tokens


def read_token(path: str | os.PathLike) -> str:
    """A device's token: the one token in its `--token-file`."""
    tokens = read_tokens(path)
    if len(tokens) > 1:
        raise SystemExit(f"--token-file {path}: holds {len(tokens)} tokens; a device's file "
                         "holds its own one")
    return tokens[0]


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
    try:
        return dequantize(t.data, t.scales, rows, cols, t.bits)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
