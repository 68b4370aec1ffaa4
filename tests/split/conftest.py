"""Fixtures of the split-mode tests: one shared server process and a tiny device."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from .harness import ROOT, Server


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
    from pocketllm.data import Batcher, encode_all, load_jsonl
    from pocketllm.models import load_model
    model, tok = load_model("tiny-llama")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    records = load_jsonl(ROOT / "examples/personal/train.jsonl")[:24]
    enc = encode_all(records, tok, mask_prompt=True, max_seq_length=200)
    return model, tok, records, Batcher(enc.items, 4, 0, tok.pad_token_id)


