"""side: split mode (MobiLLM-style), frozen forwards on the device, a side network on a server.

The device streams the quantized hidden states of every `--tap-every`-th layer at the scored
positions to `pocketllm serve`, which trains a side network on them (`pocketllm.split`). Its
steps are not a function the loop calls and waits for: the device's forward for step t+1 runs
while the server trains step t (a producer thread and a bounded queue), acknowledgements arrive
asynchronously, and a lost connection rewinds to the server's last acknowledged step. So this
method replaces `steps` (the loop's step driver) with that stream; the loop, its reports,
evaluations and summary are the same as every other method's.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import memory
from ..config import SettingError, opt
from ..memory_estimate import MB, NoGradForward
from ..split.quant import ACT_BITS
from .base import Method, StepResult, register


@dataclass
class SideArgs:
    server: str = opt("", "side: HOST:PORT of a `pocketllm serve` server")
    token_file: str = opt("", "side: file holding the server's access token")
    tls_ca: str = opt("", "side: PEM certificate (or CA) to verify the server by; empty: "
                      "plaintext (loopback / trusted network only)")
    tap_every: int = opt(1, "side: stream every k-th layer's hidden states", ge=1)
    act_bits: int = opt(8, "side: bits per streamed activation (per-token scales)",
                        choices=lambda: ACT_BITS)
    side_width: int = opt(64, "side: side network width", ge=1)
    side_depth: int = opt(1, "side: MLP blocks per tapped layer", ge=0)
    private_labels: str = opt("auto", "side: 'on' computes the loss on the device (the server "
                              "sends the side output, the device returns its gradient), so "
                              "target tokens never leave; 'auto': on whenever targets are text",
                              choices=("auto", "on", "off"))
    queue_depth: int = opt(2, "side: batches the device may run ahead of the server", ge=1)
    retry_seconds: float = opt(120.0, "side: give up after this long without reaching the "
                               "server", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (lora-adam, adam, side)", ge=0)
    delete_session: bool = opt(False, "side: once the run has saved side_network.safetensors, "
                               "delete its session (and checkpoint) from the server")


@register("side")
class SideTuning(Method):
    Config = SideArgs
    trains_model = False
    quantized_base = True  # the device's backbone only runs forward
    trainable_kinds = ("full", "lora")  # the backbone is frozen either way: --trainable is moot
    # AdamW on a freshly initialised side network: the usual rate for a small network trained
    # from scratch (not tuned here)
    defaults = {"full": {"learning_rate": 1e-3}, "lora": {"learning_rate": 1e-3}}

    keeps_best = False  # its side network is trained and kept on the server

    @classmethod
    def check(cls, run) -> None:
        if run.keep_best:
            raise SystemExit(f"--keep-best is not available with --method {cls.name}: "
                             "its side network is trained and kept on the server")
        super().check(run)

    @classmethod
    def prepare(cls, run, cfg) -> None:
        if not cfg.server or not cfg.token_file:
            raise SystemExit("--method side needs --server HOST:PORT and --token-file F")
        if run.grad_accumulation != 1:
            raise SystemExit("--method side trains one micro-batch per step: use --batch-size, "
                             "not --grad-accumulation")
        from ..split.side import SideConfig
        try:  # the server's own limits on what these flags set (the backbone is not loaded yet)
            SideConfig(model=run.model, hidden=1, taps=[0], width=cfg.side_width,
                       depth=cfg.side_depth, act_bits=cfg.act_bits).check()
        except ValueError as e:
            raise SettingError(f"--side-width / --side-depth: {e}") from None
        memory.limit_arenas(1)  # forward, gRPC and head-pass threads share one heap (memory.py)
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    @classmethod
    def memory_profile(cls, cfg, run, shape):
        """The device's frozen forward: inference's activations (no autograd, no adapter), the
        output head's loss only with private labels (labels sent: the forward stops at the
        final hidden states), plus the quantized taps of the steps the device may hold
        (--queue-depth ahead and the one being sent). Approximate, and said so in a note."""
        from ..split.client import private_labels, step_bytes
        from ..split.side import SideConfig, tap_layers
        if shape.masked:
            raise ValueError("--method side supports causal LMs only")
        private = private_labels(cfg.private_labels, class_labels=False)  # text targets
        side = SideConfig(model="", hidden=shape.hidden,
                          taps=tap_layers(shape.layers, cfg.tap_every), act_bits=cfg.act_bits,
                          private_labels=private)
        rows = run.batch_size * (run.max_seq_length - 1)  # every position scored, as inference
        queued = (cfg.queue_depth + 1) * step_bytes(rows, side)
        return NoGradForward(
            adapter=False, head=private,
            extra=((f"queued taps ({cfg.queue_depth + 1} steps, {cfg.act_bits} bits)",
                    queued / MB),),
            notes=("side: approximate; the device's forward as inference's, " + (
                "with the head loss on the device (private labels)" if private else
                "no head loss (labels sent)") + "; gRPC's buffers and threads and the side "
                "output the server sends back are not counted",))

    @classmethod
    def trainable(cls, model, run):
        from ..loss import is_masked_lm
        if is_masked_lm(model):
            raise SystemExit("--method side supports causal LMs only")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return None, []

    def __init__(self, model, params, cfg, run, objective):
        super().__init__(model, params, cfg, run, objective)
        from ..loss import output_head
        from ..split.client import SplitClient, private_labels
        from ..split.wire import read_token
        from ..split.side import SideConfig, tap_layers
        self.side = SideConfig(
            model=run.model, hidden=model.config.hidden_size,
            taps=tap_layers(model.config.num_hidden_layers, cfg.tap_every), width=cfg.side_width,
            depth=cfg.side_depth, act_bits=cfg.act_bits,
            private_labels=private_labels(cfg.private_labels, bool(run.task)),
            learning_rate=run.learning_rate, weight_decay=cfg.weight_decay, seed=run.seed)
        head = output_head(model)
        self.head = ((head.weight.detach(), None if head.bias is None else head.bias.detach())
                     if self.side.private_labels else None)
        self.client = SplitClient(cfg.server, read_token(cfg.token_file), cfg.tls_ca)
        self.sid = ""
        # the forward thread and an evaluation (which attaches the side network to the same
        # model) must not interleave
        self.model_lock = threading.Lock()
        self.totals = {"wire_bytes": 0, "forward_s": 0.0}
        self.opened = False  # the server holds the session (after Open)
        self.saved = False   # side_network.safetensors written (the run's end)
        self.start = self.acked = 0  # steps acknowledged at the start and so far

    def progress(self) -> str:
        sent = max(self.acked - self.start, 1)
        return f"wire {self.totals['wire_bytes'] / sent / 1e6:.2f} MB/step"

    def describe(self) -> str:
        return (f"server {self.cfg.server} | {len(self.side.taps)} taps at {self.cfg.act_bits} "
                f"bits | labels {'private (U-shaped)' if self.side.private_labels else 'sent to the server'}")

    def session(self, out_dir: Path, resume: bool) -> str:
        from ..split.client import SplitError, session_id
        if not self.sid:
            try:
                self.sid = session_id(Path(out_dir), resume, self.cfg.server)
            except SplitError as e:
                raise SystemExit(f"error: {e}") from None
        return self.sid

    def restore(self, out_dir) -> int:
        import grpc
        self.opened = True
        try:
            self.start = self.acked = self.client.open(self.session(out_dir, True), self.side)
        except grpc.RpcError as e:  # e.g. DATA_LOSS: the session's checkpoint is unreadable
            raise SystemExit(f"error: --resume: server {self.cfg.server}: {e.code().name}: "
                             f"{e.details()}") from None
        return self.start

    def open_log(self, out_dir, fresh):
        self.session(out_dir, not fresh)

    def step(self, batches, step, lr, eps=None):
        raise NotImplementedError("--method side streams its steps (SideTuning.steps)")

    def steps(self, batch_at, start, iters, hyper):
        from ..split.client import SplitError, device_step

        tokens: dict[int, int] = {}  # step -> tokens its forward read, until acknowledged

        def make_step(s: int):
            batch = batch_at(s - 1)[0]
            tokens[s] = int(batch["attention_mask"].sum())
            with self.model_lock:
                return device_step(self.model, batch, self.side, s, self.objective)
        self.opened = True
        try:
            for step, loss, item in self.client.steps(self.sid, self.side, make_step, iters,
                                                      self.head, self.cfg.queue_depth,
                                                      self.cfg.retry_seconds):
                extra = {}
                if item is not None:
                    extra = {"forward_s": item.forward_s, "wire_bytes": item.wire_bytes,
                             **item.extra}
                    self.totals["wire_bytes"] += item.wire_bytes
                    self.totals["forward_s"] += item.forward_s
                self.acked = step
                yield step, StepResult(loss=loss, tokens=0, forward_passes=1, extra=extra,
                                       lr=self.run.learning_rate,
                                       input_tokens=tokens.pop(step, 0))
        except SplitError as e:
            raise SystemExit(f"error: {e}") from None

    @contextmanager
    def evaluating(self):
        """The backbone with the server's side network attached (this step's, or one ahead);
        before the session exists, the backbone alone (what a zero-initialised side network
        adds nothing to)."""
        from ..split.side import AttachedSide
        if not self.opened:
            yield
            return
        try:
            _, side = self.client.fetch(self.sid)
        except Exception as e:  # grpc.RpcError: the server went away mid-run
            raise SystemExit(f"error: fetching the side network from {self.cfg.server}: {e}")
        with self.model_lock:
            attached = AttachedSide(self.model, side)
            try:
                yield
            finally:
                attached.detach()

    def save_state(self, out_dir, step, final=False):
        if final:
            from ..split.client import SIDE_FILE
            from ..split.side import save_side
            _, side = self.client.fetch(self.sid)
            save_side(side, Path(out_dir) / SIDE_FILE)
            self.saved, self.out_dir = True, Path(out_dir)

    def output_name(self, spec) -> str:
        from ..split.client import SIDE_FILE
        return SIDE_FILE

    def summary(self) -> dict:
        return {"wire_bytes": self.totals["wire_bytes"],
                "device_forward_s": self.totals["forward_s"]}

    def close(self) -> None:
        if self.cfg.delete_session and self.saved:  # after the final evaluation's fetch
            import grpc
            from ..split.client import forget_session
            try:
                step = self.client.delete(self.sid)
            except grpc.RpcError as e:
                self.client.close()
                raise SystemExit(f"error: deleting the session on {self.cfg.server}: "
                                 f"{e.code().name}: {e.details()}") from None
            forget_session(self.out_dir)
            print(f"session deleted from {self.cfg.server} at step {step}; the side network "
                  "is in side_network.safetensors", flush=True)
        self.client.close()
