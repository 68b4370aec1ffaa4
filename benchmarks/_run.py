"""Shared by the benchmark scripts: run the workload in a fresh process, read a run's dev
curve, write a table."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pocketllm.memory import run_in_fresh_process  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"


def run_mode(method: str, **kw) -> dict:
    """`python -m pocketllm.workload --method method --k v ...` in a fresh process."""
    try:
        return run_in_fresh_process(method, **kw)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def curve(run: Path) -> list[tuple[float, float, int]]:
    """(training seconds, dev accuracy, step) of each dev-set evaluation (`test_accuracy` in
    metrics.jsonl) of a `pocketllm train` run; [] for a run not started."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        m = json.loads(line)
        if m.get("test_accuracy") is not None:
            out.append((float(m.get("wall", 0.0)), float(m["test_accuracy"]), int(m["step"])))
    return out


def write_table(name: str, title: str, command: str, machine: str, header: list[str],
                rows: list[list], notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    if notes:
        lines += ["", notes.strip()]
    path = RESULTS / name
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def start_server(tmp: Path, threads: int = 1, models: list[str] | None = None,
                 log: Path | None = None, tokens: int = 1):
    """A `pocketllm serve` on a free loopback port: (process, "127.0.0.1:PORT", token file);
    the token file holds `tokens` tokens, one per line."""
    token = tmp / "token"
    token.write_text("\n".join(secrets.token_hex(16) for _ in range(tokens)))
    port_file = tmp / "port"
    log = log or tmp / "server.log"
    cmd = [sys.executable, "-m", "pocketllm.cli", "serve", "--port", "0", "--port-file",
           str(port_file), "--token-file", str(token), "--state-dir", str(tmp / "state"),
           "--threads", str(threads or 1)] + (["--models", *models] if models else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)
    while not port_file.exists():
        if proc.poll() is not None:
            raise SystemExit(f"server failed; see {log}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text()}", str(token)
