"""The device's side of split mode: frozen forward passes, taps, quantization, streaming.

A producer thread runs the backbone under `torch.inference_mode` (no autograd graph, no
training state on the device) one step ahead of the server, through a bounded queue: while the
server trains step t, the device already computes step t+1, and never runs more than
`--queue-depth` steps ahead. Only the label positions are sent.

Nothing is buffered for resends: `Batcher` makes step t's batch a pure function of t and the
forward is deterministic, so after a lost connection the client asks the server for the last
step it acknowledged (trained *and* checkpointed) and recomputes from the one after. That is how
no batch is lost or trained twice, across client reconnects and server restarts alike.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from ..objectives import Objective, for_batch
from . import split_pb2 as pb
from . import split_pb2_grpc as pb_grpc
from .quant import payload_bytes, quantize
from .side import (SideConfig, SideNetwork, first_non_finite, head_loss_grad, side_from_bytes,
                   tapped)
from .wire import RETRY_AFTER, TOKEN_HEADER, config_to_spec, decode_tensor, new_session_id

log = logging.getLogger("pocketllm.split")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.CANCELLED}
MAX_BACKOFF_S = 8.0
KEEPALIVE_MS = 60_000  # ping a quiet connection (a dead server's half-open one is then dropped)


class SplitError(RuntimeError):
    """The server refused the run (bad token, bad spec) or stayed out of reach."""


@dataclass
class DeviceStep:
    """One step's messages and what the device keeps of it until it is acknowledged."""

    step: int
    uploads: list[pb.Upload] | None  # the step's parts, each dropped once gRPC serialized it
    final: torch.Tensor | None      # private labels: the final hidden state at the label rows
    targets: torch.Tensor | None    # private labels: their target ids (never sent)
    candidates: torch.Tensor | None = None  # classification: label words' ids (per row)
    forward_s: float = 0.0
    wire_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def msg(self) -> pb.Batch:
        """The step as one Batch message (its parts merged: a copy, for inspection and tests;
        the server takes either form)."""
        whole = pb.Batch()
        for up in self.uploads:
            whole.MergeFrom(up.batch)
        whole.ClearField("part")
        whole.ClearField("parts")
        return whole


def qtensor(x: torch.Tensor, bits: int, out: pb.QTensor | None = None) -> pb.QTensor:
    """`x` quantized to `bits`, written into `out` (a field of a message being built: no copy
    of the payload) or a new QTensor."""
    q = pb.QTensor() if out is None else out
    q.data, q.scales = quantize(x, bits)
    q.bits, q.rows, q.cols = bits, x.shape[0], x.shape[1]
    return q


def device_step(model, batch: dict[str, torch.Tensor], cfg: SideConfig, step: int,
                objective: Objective | None = None) -> DeviceStep:
    """The frozen forward of one batch and the messages it becomes (scored positions only:
    `objective.scored_rows`; by default the objective whose collate made the batch).

    One message per tap (`Batch.part`): each tap is cut to its scored rows and quantized
    inside its layer's hook, straight into the upload gRPC will send. No full float32 hidden
    state outlives its layer (35 MB at 8 x 64 for the default model), no wrapper message copies
    the payload, and gRPC serializes one tap (0.3 MB) at a time instead of the step (9 MB)."""
    t0 = time.perf_counter()
    objective = objective or for_batch(batch)
    targets, candidates = objective.batch_targets(batch)
    uploads: list[pb.Upload] = []

    def part(h: torch.Tensor) -> int:
        up = pb.Upload()
        up.batch.step, up.batch.part, up.batch.parts = step, len(uploads), len(cfg.taps)
        rows = objective.scored_rows(h, batch)
        _finite_or_fail(rows, f"step {step}: tap {len(uploads)} (layer {cfg.taps[len(uploads)]})")
        qtensor(rows, cfg.act_bits, up.batch.taps.add())
        uploads.append(up)
        return up.batch.part

    with torch.inference_mode(), tapped(model, cfg.taps, part) as taps:
        out = model.base_model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"], use_cache=False)
        final = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])
        final = objective.scored_rows(final, batch).float()
        del out
    if list(taps) != list(cfg.taps) or len(uploads) != len(cfg.taps):
        # hooks fire once per layer, in layer order, and the spec lists taps in that order
        raise RuntimeError(f"{len(uploads)} taps arrived in order {list(taps)}, expected "
                           f"{list(cfg.taps)}")
    if not cfg.private_labels:
        _finite_or_fail(final, f"step {step}: the final hidden state")
        last = uploads[-1].batch
        qtensor(final, cfg.act_bits, last.final)
        last.targets = _int32(targets)
        if candidates is not None:
            last.candidates, last.n_candidates = _int32(candidates), candidates.shape[1]
    keep = cfg.private_labels
    item = DeviceStep(step, uploads, final if keep else None, targets if keep else None,
                      candidates if keep else None)
    item.forward_s = time.perf_counter() - t0
    item.wire_bytes = sum(up.batch.ByteSize() for up in uploads)
    return item


def _finite_or_fail(x: torch.Tensor, what: str) -> None:
    """SplitError unless every value of `x` is finite: the device sends nothing else."""
    if not bool(torch.isfinite(x).all()):
        raise SplitError(f"{what} is not finite (NaN or inf: the backbone's activations or "
                         "the loss overflowed); nothing of it was sent")


def _int32(t: torch.Tensor) -> bytes:
    return t.to(torch.int32).contiguous().numpy().astype("<i4").tobytes()


def step_bytes(rows: int, cfg: SideConfig) -> int:
    """Bytes the device uploads per step (protobuf framing aside): the taps, and with private
    labels the float32 gradient w.r.t. the side output, else the final state and the targets.
    (With private labels the server also sends the float32 side output down: 4 * rows * hidden.)"""
    taps = len(cfg.taps) * payload_bytes(rows, cfg.hidden, cfg.act_bits)
    if cfg.private_labels:
        return taps + payload_bytes(rows, cfg.hidden, 32)
    return taps + payload_bytes(rows, cfg.hidden, cfg.act_bits) + 4 * rows


class SplitClient:
    """A connection to a `pocketllm serve` server."""

    def __init__(self, address: str, token: str, tls_ca: str = "", max_message_mb: int = 64):
        limit = max_message_mb * 2**20
        # grpc's own reconnect backoff grows to 2 minutes by default; ours (`train`) decides
        opts = [("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.ping_timeout_ms", 20_000), ("grpc.http2.max_pings_without_data", 0)]
        if tls_ca:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.address = address
        self.stub = pb_grpc.SideTuningStub(self.channel)
        self.md = ((TOKEN_HEADER, f"Bearer {token}"),)
        self.acked = 0

    def close(self) -> None:
        self.channel.close()

    def health(self, timeout: float = 5.0) -> pb.HealthReply:
        return self.stub.Health(pb.HealthRequest(), timeout=timeout)

    def open(self, sid: str, cfg: SideConfig) -> int:
        """Create or rejoin the session; returns the server's last acknowledged step."""
        r = self.stub.Open(pb.OpenRequest(session_id=sid, spec=config_to_spec(cfg)),
                           metadata=self.md, timeout=120, wait_for_ready=True)
        return int(r.step)

    def fetch(self, sid: str) -> tuple[int, SideNetwork]:
        r = self.stub.Fetch(pb.FetchRequest(session_id=sid), metadata=self.md, timeout=120)
        side = side_from_bytes(r.safetensors)
        bad = first_non_finite(side.state_dict().items())
        if bad:
            raise SplitError(f"server {self.address}: the side network fetched at step "
                             f"{r.step} holds non-finite values ({bad})")
        return int(r.step), side

    def delete(self, sid: str) -> int:
        """Delete the session (and its checkpoint) from the server; returns the step it had
        reached. NOT_FOUND if it does not exist (or another token owns it)."""
        r = self.stub.Delete(pb.DeleteRequest(session_id=sid), metadata=self.md, timeout=120)
        return int(r.step)

    def train(self, sid: str, cfg: SideConfig, make_step: Callable[[int], DeviceStep],
              iters: int, head: tuple[torch.Tensor, torch.Tensor | None] | None,
              on_ack: Callable[[int, float, DeviceStep], None], queue_depth: int = 2,
              retry_seconds: float = 120.0) -> int:
        """Train steps 1..iters, calling on_ack(step, loss, item) as each is acknowledged;
        returns the last acknowledged step."""
        for step, loss, item in self.steps(sid, cfg, make_step, iters, head, queue_depth,
                                           retry_seconds):
            on_ack(step, loss, item)
        return self.acked

    def steps(self, sid: str, cfg: SideConfig, make_step: Callable[[int], DeviceStep],
              iters: int, head: tuple[torch.Tensor, torch.Tensor | None] | None,
              queue_depth: int = 2, retry_seconds: float = 120.0
              ) -> Iterator[tuple[int, float, DeviceStep | None]]:
        """Train steps 1..iters, reconnecting with backoff; yields (step, loss, the device's
        step or None) as each step is acknowledged, in order."""
        try:
            cfg.check()
        except ValueError as e:
            raise SplitError(f"side network settings: {e}") from None
        attempt, last_ok = 0, time.time()
        while True:
            before, retry_after = self.acked, None
            try:
                self.acked = self.open(sid, cfg)
                if self.acked >= iters:
                    return
                yield from self._stream(sid, cfg, make_step, iters, head, queue_depth)
                if self.acked >= iters:
                    return
                err = "the server closed the stream early"
            except grpc.RpcError as e:
                retry_after = _retry_after(e)
                if e.code() not in RETRYABLE or (
                        e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is None):
                    # e.g. a message over the size limit, a full server (its session limits):
                    # refused the same way on every retry
                    hint = ("; every retry would be refused the same: send fewer rows a step "
                            "(--batch-size) or raise the server's --max-message-mb"
                            if "larger than max" in (e.details() or "") else "")
                    raise SplitError(f"server {self.address}: {e.code().name}: "
                                     f"{e.details()}{hint}") from None
                err = f"{e.code().name}: {e.details()}"
            if self.acked > before:
                attempt, last_ok = 0, time.time()
            if time.time() - last_ok > retry_seconds:
                what = "out of reach" if retry_after is None else "refused the run"
                raise SplitError(f"server {self.address} {what} for {retry_seconds:.0f}s "
                                 f"({err}); rerun with --resume to continue after step "
                                 f"{self.acked}")
            delay = min(MAX_BACKOFF_S, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2)
            if retry_after is not None:  # the server said when: no need to wait longer
                delay = min(delay, max(retry_after, 0.05))
            attempt += 1
            log.warning("server %s: %s; retrying in %.1fs from step %d", self.address, err,
                        delay, self.acked + 1)
            time.sleep(delay)

    def _stream(self, sid, cfg, make_step, iters, head, queue_depth
                ) -> Iterator[tuple[int, float, DeviceStep | None]]:
        stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=max(1, queue_depth))
        grads: queue.Queue = queue.Queue()
        inflight: dict[int, DeviceStep] = {}
        failure: list[BaseException] = []
        end = object()

        def wait_get(q):
            while not stop.is_set():
                try:
                    return q.get(timeout=0.05)
                except queue.Empty:
                    pass
            return end

        def offer(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for step in range(self.acked + 1, iters + 1):
                    if not offer(make_step(step)):
                        return
                offer(end)
            except BaseException as e:  # surfaced by the main thread
                failure.append(e)
                stop.set()

        def requests():
            while True:
                item = wait_get(ready)
                if item is end:
                    return
                inflight[item.step] = item
                parts, item.uploads = item.uploads, None
                while parts:
                    # gRPC serializes each message before it asks for the next, and a resend
                    # after a reconnect recomputes the step (see the module docstring): so
                    # each part is let go as soon as it is handed over
                    up = parts.pop(0)
                    up.session_id = sid
                    yield up
                    del up
                if cfg.private_labels:
                    g = wait_get(grads)
                    if g is end:
                        return
                    yield pb.Upload(session_id=sid, grad=g)

        producer = threading.Thread(target=produce, name="split-forward", daemon=True)
        producer.start()
        call = self.stub.Train(requests(), metadata=self.md)
        try:
            for reply in call:
                if reply.WhichOneof("kind") == "output":
                    o = reply.output
                    item = inflight[o.step]
                    t0 = time.perf_counter()
                    try:
                        delta = decode_tensor(o.delta, item.final.shape[0], cfg.hidden,
                                              "delta", (32,))
                    except ValueError as e:
                        raise SplitError(f"server {self.address}: step {o.step}: the side "
                                         f"output received: {e}") from None
                    loss, gz = head_loss_grad(item.final + delta, item.targets, *head,
                                              candidates=item.candidates)
                    if not math.isfinite(loss):
                        raise SplitError(f"step {o.step}: the device's loss ({loss}) is not "
                                         "finite; nothing of it was sent")
                    _finite_or_fail(gz, f"step {o.step}: the device's gradient")
                    item.extra["head_s"] = time.perf_counter() - t0
                    grads.put(pb.Grad(step=o.step, grad=qtensor(gz, 32), loss=loss))
                    item.wire_bytes += o.ByteSize()  # counted both ways
                else:
                    a = reply.ack
                    item = inflight.pop(a.step, None)
                    if not math.isfinite(a.loss):
                        raise SplitError(f"server {self.address}: step {a.step} acknowledged "
                                         f"with a non-finite loss ({a.loss})")
                    if not a.duplicate and a.step == self.acked + 1:
                        self.acked = a.step
                        yield a.step, float(a.loss), item
        finally:
            stop.set()
            call.cancel()
            producer.join()
        if failure:
            raise failure[0]


# --------------------------------------------------------------------------------------------
# the run directory of `pocketllm train --method side`
# --------------------------------------------------------------------------------------------
SESSION_FILE = "session.json"
SIDE_FILE = "side_network.safetensors"


def _retry_after(e: grpc.RpcError) -> float | None:
    """The server's retry-after on a refusal worth retrying (`wire.RETRY_AFTER`), else None."""
    for key, value in getattr(e, "trailing_metadata", lambda: None)() or ():
        if key == RETRY_AFTER:
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def private_labels(setting: str, class_labels: bool) -> bool:
    """'auto': private unless the targets are class labels (text targets *are* the text)."""
    return setting == "on" or (setting == "auto" and not class_labels)


def session_id(out: Path, resume: bool, server: str) -> str:
    """The run's session id: kept in the output directory so `--resume` rejoins it."""
    path = out / SESSION_FILE
    if resume and path.exists():
        info = json.loads(path.read_text())
        if info.get("deleted"):
            raise SplitError(f"{path}: this run's session was deleted from the server "
                             f"(--delete-session); its side network is in {out / SIDE_FILE}")
        return info["session_id"]
    sid = new_session_id()
    path.write_text(json.dumps({"session_id": sid, "server": server}))
    path.chmod(0o600)  # the id lets its holder (with the token) read the side network back
    return sid


def forget_session(out: Path) -> None:
    """Mark the run's session deleted (`--delete-session`): a `--resume` then says so instead
    of opening a fresh session at step 0."""
    path = out / SESSION_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "deleted": True}))
