"""Tiny federations: tiny-llama devices, each with its own model copy and share of eight
records, driven in-process through the round protocol (no Flower)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketllm.config import FederateArgs
from tests.helpers import TEXTS, write_data

# eight labelled notes (two of each of tests.helpers' four texts, numbered apart)
RECORDS = [(f"{t} ({i})", label) for i, (t, label) in
           enumerate(zip(TEXTS * 2, [" pets", " health", " health", " money"] * 2))]
SETTINGS = {"queries": 4}
N = 3  # devices


@pytest.fixture(scope="session")
def fed_data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("fed_data"),
                      [(f"Note: {t}\nCategory:", c) for t, c in RECORDS])


def fed_args(data: Path, out: Path | str = "federation", **kw) -> FederateArgs:
    base = dict(model="tiny-llama", data=str(data), trainable="lora", lora_rank=4, iters=4,
                batch_size=2, max_seq_length=64, clients=N, learning_rate=1e-2, seed=3,
                adapter_path=str(out), threads=1)
    return FederateArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def devices(fed_data):
    """N devices (each its own model and partition) and one with no data of its own."""
    from pocketllm.federated import build
    args = fed_args(fed_data)
    out = {}
    for p in range(N):
        sh = build.load(args, dict(SETTINGS))
        sh.device.batch_at = build.batches_for(sh, p, N)
        out[p] = sh.device
    out[N] = build.load(args, dict(SETTINGS)).device  # follows the log only
    return out


@pytest.fixture
def fresh(devices):
    """The module's devices, back at the base weights."""
    for d in devices.values():
        d.reset()
    return devices
