"""Fixtures of the split-mode tests: one shared server process and a tiny device."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from .harness import STEPS, Server, make_device, run_session, side_config


@pytest.fixture(scope="package")
def token_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("token") / "token"
    p.write_text(secrets.token_hex(16) + "\n")
    return p


@pytest.fixture(scope="package")
def server(tmp_path_factory, token_file):
    s = Server(tmp_path_factory.mktemp("srv") / "state", token_file).start()
    yield s
    s.stop()


@pytest.fixture(scope="package")
def device():
    """tiny-llama and a batch schedule over a few personal notes (labels: the completions)."""
    return make_device()


@pytest.fixture(scope="package")
def reference(server, token_file, device):
    """An uninterrupted run of STEPS steps: the acks and side network every interrupted run
    must end up equal to."""
    cfg = side_config(device[0])
    client, sid, acks = run_session(server.address, token_file, device, cfg, STEPS)
    step, side = client.fetch(sid)
    client.close()
    assert step == STEPS and [a[0] for a in acks] == list(range(1, STEPS + 1))
    return acks, side
