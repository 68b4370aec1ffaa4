"""What the device (client.py) and the server (server.py) agree on besides split.proto: the token's
header, the token file, a side network's config as a SideSpec, and checked decoding of a QTensor.

Both sides import this module; neither imports the other."""

from __future__ import annotations

import os
import secrets
import string
from dataclasses import asdict
from pathlib import Path

import torch

from . import split_pb2 as pb
from .quant import dequantize
from .side import SideConfig

TOKEN_HEADER = "authorization"
# trailing metadata on a refusal that is worth retrying (a busy stream slot or session): seconds
# to wait. A RESOURCE_EXHAUSTED without it (a message over the size limit) would fail the same way
# on every retry.
RETRY_AFTER = "pocketllm-retry-after-s"
SESSION_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-_")


def session_id_problem(sid: str) -> str:
    """Why `sid` cannot name a session ('' if it can): a session id is the session's only secret
    besides the shared token, so it must be long and look random. A 128-bit `secrets.token_hex`
    passes with probability > 1 - 1e-6 (and `new_session_id` draws again if not)."""
    if not 32 <= len(sid) <= 128:
        return f"session id must be 32..128 characters, got {len(sid)}"
    if not set(sid) <= SESSION_ID_CHARS:
        return "session id must be letters, digits, '-' or '_'"
    counts = [sid.count(c) for c in set(sid)]
    periodic = any(sid[p:] == sid[:-p] for p in range(1, len(sid) // 2 + 1))
    if len(counts) < 8 or max(counts) > len(sid) // 2 or periodic:
        return "session id looks non-random (too few distinct characters or a repeated pattern)"
    return ""


def new_session_id() -> str:
    """A random session id the server accepts."""
    while True:
        sid = secrets.token_hex(16)
        if not session_id_problem(sid):
            return sid


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
