"""The side network, the taps that feed it, and the output-head loss both ends of a split share.

The side network is a ladder of small position-wise blocks beside the frozen backbone: each
tapped layer's hidden state is RMS-normalised, projected down to the side width and added to
the side stream, which `depth` residual MLP blocks refine; the stream is projected back up to
the hidden size and *added to the backbone's final hidden state* before the output head. The up
projection starts at zero, so the untrained side network changes nothing: the combined model
predicts exactly what the backbone does (the LoRA trick, applied to a whole side path).

Position-wise blocks need no attention over the sequence (the backbone's hidden states already
carry the context), which is what lets the device send the label positions only.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..loss import PlainHead, decoder_layers, stream_head
from .quant import ACT_BITS, payload_bytes, roundtrip

CANDIDATE_BLOCK = 1 << 20  # floats of gathered label-word head rows alive at a time (4 MB)


@dataclass
class SideConfig:
    """What defines a side network (the server builds it from this; it is saved beside it)."""

    model: str
    hidden: int
    taps: list[int]
    width: int = 64
    depth: int = 1
    act_bits: int = 8
    private_labels: bool = True
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SideConfig":
        return cls(**json.loads(text))

    def check(self, n_layers: int | None = None) -> None:
        """ValueError naming the field when the config cannot describe a side network."""
        if not 1 <= self.hidden <= 65536:
            raise ValueError(f"hidden size {self.hidden} out of range")
        if not 1 <= self.width <= 16384 or not 0 <= self.depth <= 16:
            raise ValueError(f"side width {self.width} / depth {self.depth} out of range "
                             "(1..16384, 0..16)")
        if not self.taps or len(self.taps) > 512 or sorted(set(self.taps)) != list(self.taps):
            raise ValueError(f"taps must be 1..512 distinct ascending layer indices, got {self.taps}")
        if n_layers is not None and self.taps[-1] >= n_layers:
            raise ValueError(f"tap {self.taps[-1]} beyond the backbone's {n_layers} layers")
        if self.act_bits not in ACT_BITS:
            raise ValueError(f"act_bits must be 16, 8 or 4, got {self.act_bits}")
        # AdamW's update is lr-sized per step and decays by lr * weight_decay: beyond these a
        # side network only diverges, and NaN / inf would reach its parameters
        lr, wd = float(self.learning_rate), float(self.weight_decay)
        if not (math.isfinite(lr) and 0 < lr <= 1):
            raise ValueError(f"learning_rate {lr} out of range: a finite rate in (0, 1]")
        if not (math.isfinite(wd) and wd >= 0 and lr * wd < 1):
            raise ValueError(f"weight_decay {wd} out of range: finite, >= 0 and with "
                             f"learning_rate x weight_decay below 1 (learning_rate {lr})")


def side_params(cfg: SideConfig) -> int:
    """The side network's parameter count, from its config alone (nothing is built)."""
    h, w = cfg.hidden, cfg.width
    block = 2 * w + (w * 2 * w + 2 * w) + (2 * w * w + w)              # norm, fc1, fc2
    return len(cfg.taps) * (h * w + w + cfg.depth * block) + 2 * w + (w * h + h)


def side_memory(cfg: SideConfig) -> int:
    """Bytes a session holds in the server's memory: its weights and AdamW's two moments (12 B
    a parameter) and about 8 KB of Python objects per module (measured 5.5 KB; a deep, narrow
    network of many small modules costs more in objects than in parameters)."""
    modules = 5 + len(cfg.taps) * (2 + 4 * cfg.depth)
    return 12 * side_params(cfg) + 8192 * modules


def step_memory(cfg: SideConfig, rows: int, n_candidates: int = 0, vocab: int = 1 << 30) -> int:
    """Bytes of server memory one training step of `rows` rows may take at its peak, beyond
    the session's parameters and optimizer state: a conservative count from the shapes of what
    `pocketllm serve` holds (the server refuses a step over `--max-step-mb` with it)."""
    from ..loss import VOCAB_CHUNK
    r, h, w, t, f = rows, cfg.hidden, cfg.width, len(cfg.taps), 4
    wire = t * payload_bytes(r, h, cfg.act_bits)
    if not cfg.private_labels:
        wire += payload_bytes(r, h, cfg.act_bits) + 4 * r + 4 * r * n_candidates
    b = 3 * wire                           # its parts, their merged copy, gRPC's receive buffer
    b += t * r * h * f + 12 * r * h        # decoded taps; one tap's dequantization temporaries
    b += t * r * (h + w * (2 + 7 * cfg.depth)) * f  # what autograd keeps per tap for backward
    b += r * (w + h) * f + r * (h + 4 * w) * f      # output norm and delta; backward temporaries
    if cfg.private_labels:
        b += 6 * r * h * f                 # side output sent, gradient received (tensor, bytes, message)
    else:
        b += 6 * r * h * f + r * min(VOCAB_CHUNK, vocab) * f  # final, z, head block, grad
        if n_candidates:                   # ids (int32, int64), logits, softmax, log-softmax
            b += 28 * r * n_candidates + 2 * CANDIDATE_BLOCK * f
    # gradients and AdamW's temporaries; or, before the step, reloading an evicted session:
    # its checkpoint (weights, two moments) beside the fresh network's initial weights
    return b + 16 * side_params(cfg)


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, else None."""
    for name, t in named:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def tap_layers(n_layers: int, every: int) -> list[int]:
    """Every `every`-th layer's output, counting from the first: 0-based indices ending at or
    before the last layer (every=1: all layers)."""
    if every < 1:
        raise ValueError(f"--tap-every must be >= 1, got {every}")
    return list(range(every - 1, n_layers, every)) or [n_layers - 1]


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s + self.fc2(nn.functional.gelu(self.fc1(self.norm(s))))


class SideNetwork(nn.Module):
    """Ladder side network: taps (each (N, hidden)) -> delta (N, hidden) for the final state."""

    def __init__(self, cfg: SideConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(int(cfg.seed))
        self.down = nn.ModuleList(nn.Linear(cfg.hidden, cfg.width) for _ in cfg.taps)
        self.blocks = nn.ModuleList(nn.Sequential(*(_Block(cfg.width) for _ in range(cfg.depth)))
                                    for _ in cfg.taps)
        self.out_norm = nn.LayerNorm(cfg.width)
        self.up = nn.Linear(cfg.width, cfg.hidden)
        with torch.no_grad():  # seeded, independent of the global RNG: both ends agree
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, m.in_features ** -0.5, generator=g)
                    m.bias.zero_()
            self.up.weight.zero_()  # untrained: delta = 0, the backbone's own prediction

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        if len(taps) != len(self.down):
            raise ValueError(f"side network takes {len(self.down)} taps, got {len(taps)}")
        s = None
        for h, down, blocks in zip(taps, self.down, self.blocks):
            h = h.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # tames outlier layers
            s = down(h) if s is None else s + down(h)
            s = blocks(s)
        return self.up(self.out_norm(s))


def head_loss_grad(z: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None, candidates: torch.Tensor | None = None
                   ) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy of head(z) against `targets` and its gradient w.r.t. z (softmax @ W
    minus the target's row), streamed over the vocabulary in one pass (`loss.stream_head`), so
    neither end ever holds the (N, vocab) logits or an autograd graph through the head.

    With `candidates` (N, C) token ids (a classification task's label words), the softmax is
    over those rows of the head only and `targets` are indices into them."""
    z = z.detach().float()
    n = z.shape[0]
    if n == 0:
        return 0.0, torch.zeros_like(z)
    if candidates is not None:
        # each row's label-word head rows, (rows, C, H), gathered a block of rows at a time:
        # gathered whole they are hidden-size times the candidate ids the step carried
        c = candidates.shape[1]
        blk = max(1, CANDIDATE_BLOCK // max(1, c * z.shape[1]))
        lg, grad = z.new_empty(n, c), torch.empty_like(z)
        for i in range(0, n, blk):
            lg[i:i + blk] = torch.einsum("nh,nch->nc", z[i:i + blk],
                                         weight[candidates[i:i + blk]].float())
        if bias is not None:
            lg = lg + bias[candidates].float()
        p = torch.softmax(lg, dim=1)
        loss = float(torch.nn.functional.cross_entropy(lg, targets))
        p[torch.arange(n), targets] -= 1.0
        for i in range(0, n, blk):
            grad[i:i + blk] = torch.einsum("nc,nch->nh", p[i:i + blk],
                                           weight[candidates[i:i + blk]].float())
        return loss, grad / n
    with torch.no_grad():  # (the pass's in-place buffers)
        p = stream_head(z, targets, PlainHead.of(weight, bias).chunks(1), mean_row=True)
    loss = float(p.nll.mean())
    grad = p.mean_row - weight[targets].float()
    return loss, grad / n


# --------------------------------------------------------------------------------------------
# Taps on the device
# --------------------------------------------------------------------------------------------
@contextmanager
def tapped(model: nn.Module, taps: list[int], keep: Callable[[torch.Tensor], object] | None = None
           ) -> Iterator[dict[int, object]]:
    """Within the block, every forward stores layer i's output hidden state in out[i], or
    `keep(hidden)` when given: the device quantizes each tap as it is produced, so it never
    holds more than one layer's full hidden state beyond what the forward itself holds."""
    out: dict[int, object] = {}
    layers = decoder_layers(model)
    me = threading.get_ident()  # a forward of the same model in another thread is not ours

    def hook(i):
        def fn(_mod, _inp, output):
            if threading.get_ident() == me:
                h = output[0] if isinstance(output, (tuple, list)) else output
                out[i] = h if keep is None else keep(h)
        return fn
    handles = [layers[i].register_forward_hook(hook(i)) for i in taps]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


class AttachedSide:
    """A trained side network running on the device with its backbone: the backbone's final
    hidden state gets the side network's delta added (at every position), so `generate`,
    `evaluate` and `token_stats` see the combined model. Remove with `detach()`."""

    def __init__(self, model: nn.Module, side: SideNetwork):
        self.side = side.eval()
        cfg = side.cfg
        self._taps: dict[int, torch.Tensor] = {}
        layers = decoder_layers(model)
        self._handles = [layers[i].register_forward_hook(self._store(i)) for i in cfg.taps]
        self._handles.append(model.base_model.register_forward_hook(self._add))

    def _store(self, i):
        def fn(_mod, _inp, output):
            self._taps[i] = output[0] if isinstance(output, (tuple, list)) else output
        return fn

    def _add(self, _mod, _inp, output):
        cfg = self.side.cfg
        taps = [roundtrip(self._taps[i], cfg.act_bits) for i in cfg.taps]
        shape = taps[0].shape
        delta = self.side([t.reshape(-1, shape[-1]) for t in taps]).reshape(shape)
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype),) + output[1:]
        output.last_hidden_state = output.last_hidden_state + delta.to(output.last_hidden_state.dtype)
        return output

    def detach(self) -> None:
        for h in self._handles:
            h.remove()


def _tensors(side: SideNetwork) -> dict[str, torch.Tensor]:
    # copies: the server's weights are views of one buffer, which safetensors refuses to save
    return {k: v.detach().clone() for k, v in side.state_dict().items()}


def save_side(side: SideNetwork, path) -> None:
    from safetensors.torch import save_file
    save_file(_tensors(side), str(path), metadata={"pocketllm_side_config": side.cfg.to_json()})


def side_to_bytes(side: SideNetwork) -> bytes:
    from safetensors.torch import save
    return save(_tensors(side), metadata={"pocketllm_side_config": side.cfg.to_json()})


def side_from_bytes(data: bytes) -> SideNetwork:
    """The side network in a safetensors blob (what the server's Fetch returns)."""
    from safetensors.torch import load
    if len(data) < 8:
        raise ValueError("side network blob too short")
    n = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, then JSON header
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    return _build(meta, load(data), "<fetched side network>")


def load_side(path) -> SideNetwork:
    """A side network saved by `save_side` / fetched from the server (a .safetensors file)."""
    from safetensors import safe_open
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        with safe_open(str(path), "pt") as st:
            meta = st.metadata() or {}
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"not a safetensors file ({e})") from None
    return _build(meta, tensors, str(path))


def _build(meta: dict, tensors: dict, where: str) -> SideNetwork:
    if "pocketllm_side_config" not in meta:
        raise ValueError(f"{where}: not a pocketllm side network (no pocketllm_side_config "
                         "metadata)")
    side = SideNetwork(SideConfig.from_json(meta["pocketllm_side_config"]))
    side.load_state_dict(tensors)
    return side


def attach_side(model: nn.Module, path) -> AttachedSide:
    """Load the side network at `path` and attach it to `model` (checking it fits)."""
    side = load_side(path)
    n = model.config.num_hidden_layers
    if side.cfg.hidden != model.config.hidden_size or side.cfg.taps[-1] >= n:
        raise ValueError(f"{path}: side network for hidden {side.cfg.hidden}, taps "
                         f"{side.cfg.taps}; model {side.cfg.model!r} expected, this one has "
                         f"hidden {model.config.hidden_size} and {n} layers")
    return AttachedSide(model, side)
