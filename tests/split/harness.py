"""Real `pocketllm serve` processes on loopback, a cuttable TCP proxy, and a tiny device's
training through the client library."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


class Server:
    """A `pocketllm serve` child process (one torch thread: deterministic steps)."""

    def __init__(self, state_dir: Path, token_file: Path, port: int = 0, args: tuple = ()):
        self.state_dir, self.token_file = state_dir, token_file
        self.port = port
        self.args = [str(a) for a in args]  # more `pocketllm serve` flags (limits)
        self.log = state_dir.parent / f"server-{state_dir.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        port_file = self.state_dir.parent / f"port-{self.state_dir.name}"
        port_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pocketllm.cli", "serve", "--port", str(self.port),
             "--port-file", str(port_file), "--token-file", str(self.token_file),
             "--state-dir", str(self.state_dir), "--threads", "1", "--max-message-mb", "4", *self.args],
            env=env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        deadline = time.time() + 300  # a loaded CI machine imports torch slowly
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Proxy:
    """Forwards a loopback port to the server, records client->server bytes, and can cut every
    open connection (a network drop, seen by both ends)."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.upstream = bytearray()
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self.conns += [c, s]
            threading.Thread(target=self._pipe, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, False), daemon=True).start()

    def _pipe(self, src, dst, record):
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.upstream += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self.sock.close()


def side_config(model, private: bool = True, bits: int = 8, seed: int = 0):
    from pocketllm.split.side import SideConfig, tap_layers
    return SideConfig(model="tiny-llama", hidden=model.config.hidden_size,
                      taps=tap_layers(model.config.num_hidden_layers, 1), width=16, depth=1,
                      act_bits=bits, private_labels=private, learning_rate=1e-2, seed=seed)


def run_session(address: str, token_file: Path, device, cfg, iters: int, sid: str | None = None,
                on_ack=None, retry_seconds: float = 60.0):
    """Train `iters` steps through the client library; returns (client, session id, acks)."""
    from pocketllm.split.client import SplitClient, device_step
    from pocketllm.split.wire import read_token
    model, _, _, batcher = device
    sid = sid or secrets.token_hex(16)
    head = model.get_output_embeddings()
    acks: list[tuple[int, float]] = []

    def ack(step, loss, item):
        acks.append((step, loss))
        if on_ack:
            on_ack(step)
    client = SplitClient(address, read_token(token_file))
    client.train(sid, cfg, lambda s: device_step(model, batcher(s - 1), cfg, s), iters,
                 (head.weight.detach(), None), ack, queue_depth=2, retry_seconds=retry_seconds)
    return client, sid, acks


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
