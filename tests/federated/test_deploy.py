"""The deployment path with real processes on loopback: `pocketllm federate serve` (a
flower-superlink and `flwr run`) and two `pocketllm federate join` (flower-supernodes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pocketllm.federated.deploy import free_port, write_settings
from tests.federated.conftest import SETTINGS, fed_args

pytest.importorskip("flwr")
ROOT = Path(__file__).resolve().parents[2]


def test_settings_files_read_back_as_written(fed_data, tmp_path):
    from pocketllm.federated.app import settings_from_file
    args = fed_args(fed_data, tmp_path, keep_best=True, partition="dirichlet:0.5")
    path = write_settings(args, dict(SETTINGS), tmp_path / "s.yaml")
    back, settings = settings_from_file(str(path))
    assert back == args and settings == SETTINGS


def test_join_refuses_a_partition_beyond_the_clients(fed_data, tmp_path, capsys):
    from pocketllm.cli import main
    with pytest.raises(SystemExit, match="--partition-id 3 must be < --clients 2"):
        main(["federate", "join", "--model", "tiny-llama", "--data", str(fed_data),
              "--clients", "2", "--partition-id", "3", "--adapter-path", str(tmp_path)])


def test_serve_and_two_joined_devices_on_loopback(fed_data, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    common = ["--model", "tiny-llama", "--data", str(fed_data), "--clients", "2", "--iters", "1",
              "--queries", "4", "--batch-size", "2", "--max-seq-length", "64", "--lora-rank",
              "4", "--address", address, "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "pocketllm.cli", "federate"]

    def start(action, out, *extra):
        log = open(tmp_path / f"{out}.log", "w")
        return subprocess.Popen([*cli, action, *common, "--adapter-path", str(tmp_path / out),
                                 *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    server = start("serve", "server")
    devices = [start("join", f"d{p}", "--partition-id", str(p)) for p in range(2)]
    try:
        assert server.wait(240) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in [server, *devices]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in devices:
            p.wait(30)
    summary = json.loads((tmp_path / "server" / "fed_summary.json").read_text())
    # (one round: Flower starts a ClientApp process, which loads the model, per message)
    assert summary["rounds"] == 1 and summary["agree"] == 2 and not summary["differ"]
    recs = [json.loads(x) for x in
            (tmp_path / "server" / "fed_log.jsonl").read_text().splitlines()[1:]]
    assert [len(r["clients"]) for r in recs] == [2]
    assert "2 devices hold the same weights" in (tmp_path / "server.log").read_text()
    assert (tmp_path / "server" / "adapter_model.safetensors").is_file()  # rebuilt from the log
