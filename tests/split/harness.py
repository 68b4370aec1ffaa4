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
STEPS = 6  # the reference run's length (conftest.reference)


class Server:
    """A `pocketllm serve` child process (one torch thread: deterministic steps)."""

    def __init__(self, state_dir: Path, token_file: Path, port: int = 0, args: tuple = ()):
        self.state_dir, self.token_file = state_dir, token_file
        self.port, self.args = port, [str(a) for a in args]  # args: more `serve` flags
        self.log = state_dir.parent / f"server-{state_dir.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, forked: bool = False) -> "Server":
        """Start the server; `forked`: fork it from a process that has imported torch already
        (`_Forked`: the same `serve`, started in a fraction of a second)."""
        port_file = self.state_dir.parent / f"port-{self.state_dir.name}"
        port_file.unlink(missing_ok=True)
        argv = ["serve", "--port", str(self.port), "--port-file", str(port_file),
                "--token-file", str(self.token_file), "--state-dir", str(self.state_dir),
                "--threads", "1", "--max-message-mb", "4", *self.args]
        if forked:
            self.proc = _Forked(_serve_main, argv, str(self.log))
        else:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            self.proc = subprocess.Popen([sys.executable, "-m", "pocketllm.cli", *argv],
                                         env=env, stdout=open(self.log, "a"),
                                         stderr=subprocess.STDOUT)
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


def _to_log(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _serve_main(argv: list[str], log: str) -> None:
    _to_log(log)
    from pocketllm.cli import main
    sys.exit(main(argv))


class _Forked:
    """A process forked by multiprocessing's fork server, which imports torch, transformers and
    the CLI once (2-5 s a process otherwise) and no gRPC: gRPC is imported after the fork, so
    no gRPC state is inherited. Has the Popen methods `Server` and `Device` use."""

    _ctx = None

    def __init__(self, target, *args):
        if _Forked._ctx is None:
            import multiprocessing
            _Forked._ctx = multiprocessing.get_context("forkserver")
            _Forked._ctx.set_forkserver_preload(["torch", "pocketllm.cli", "pocketllm.methods"])
        self.p = _Forked._ctx.Process(target=target, args=args, daemon=True)
        self.p.start()
        self.pid = self.p.pid

    def poll(self):
        return self.p.exitcode

    def wait(self, timeout: float | None = None):
        self.p.join(timeout)
        if self.p.exitcode is None:
            raise subprocess.TimeoutExpired("pocketllm serve", timeout)
        return self.p.exitcode

    def send_signal(self, sig) -> None:
        os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


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


def make_device():
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


class Device:
    """A device training a session in a child process (forked: `_Forked`), one the tests can
    SIGSTOP. Each acknowledged step is appended to `acks` as it comes; after step `pause_at`
    it stops reading replies (as if its training loop hung), for the test to freeze it there."""

    def __init__(self, workdir: Path, name: str, address: str, token_file: Path, sid: str,
                 iters: int, retry_seconds: float = 60.0, pause_at: int = 0):
        self.acks_file, self.log = workdir / f"{name}.acks", workdir / f"{name}.log"
        self.acks_file.write_text("")
        self.proc = _Forked(_device_main, address, str(token_file), sid, iters, retry_seconds,
                            pause_at, str(self.acks_file), str(self.log))

    def acks(self) -> list[tuple[int, float]]:
        return [(int(s), float(x)) for s, x in
                (line.split() for line in self.acks_file.read_text().splitlines())]

    def wait_for_step(self, step: int, timeout: float = 300.0) -> None:
        deadline = time.time() + timeout
        while not any(s >= step for s, _ in self.acks()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"device did not reach step {step}: {self.log.read_text()}")
            time.sleep(0.02)

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(60)


def _device_main(address, token, sid, iters, retry_seconds, pause_at, acks_path, log) -> None:
    import logging
    from pocketllm.split.client import SplitClient, device_step
    from pocketllm.split.wire import read_token
    _to_log(log)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    model, _, _, batcher = make_device()
    cfg = side_config(model)
    client = SplitClient(address, read_token(token))
    with open(acks_path, "a") as out:
        def on_ack(step, loss, item):
            out.write(f"{step} {loss!r}\n")
            out.flush()
            if step == pause_at:
                time.sleep(3600)
        client.train(sid, cfg, lambda s: device_step(model, batcher(s - 1), cfg, s), iters,
                     (model.get_output_embeddings().weight.detach(), None), on_ack,
                     retry_seconds=retry_seconds)
    client.close()
