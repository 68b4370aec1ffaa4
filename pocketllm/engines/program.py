"""What the inference-engine backends (`--engine onnxruntime|executorch`) export and run: a
zeroth-order step's forward passes as one pure function, and the engine around it.

`StepProgram` is the model as a function of its trainable tensors: a Llama-family forward whose
LoRA A/B are inputs (one flat float32 vector), W replicas of the batch each seeing its own
perturbed adapter (`w + scale[r] * z(keys[r])`, z generated INSIDE the program from the keys
with `zo/noise.py`'s counter hash in int64 tensor ops), the LoRA products of all replicas in one
`bmm`, and pocketllm's loss on the scored positions only: the label words' head rows (a
classification objective) or the whole vocabulary streamed in chunks (language modelling),
never a (rows, seq, vocab) logits tensor. It returns the W per-replica losses.

Shapes are fixed per program (an engine program has no dynamic shapes worth the risk), so a
batch is padded to a bucket (`bucket`): rows, sequence length and scored positions each rounded
up to a power of two, the padding masked out of attention and weighted 0 in the loss; the
replicas per call are the widest pass of the run's plan (narrower passes padded with unperturbed
replicas). A program is exported once per (model, shapes, trainable set, versions) and cached
on disk (`ProgramCache`); a stale or corrupt entry is rebuilt, never trusted.

`ProgramEngine` is the `Engine` on top: it keeps the trainable tensors on the host (the seeded
updates go through `zo.noise.add_noise_`, bit for bit the torch engine's, so a ZO log replays
anywhere) and evaluates a plan's replicas through the backend's program. A subclass says how
to export (`compile`) and how to run (`load`) a program.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import memory
from ..data.batching import IGNORE_INDEX
from ..lora import LoRALinear
from ..loss import TokenStats
from ..objectives.classification import class_result
from ..quantize import SCHEMES, FloatRows, Int8Rows
from ..zo import noise
from ..zo.plan import Plan
from ..zo.shared import first_trained_layer
from .base import Engine

MIN_SEQ = 16                # the smallest sequence bucket
# a StepProgram's inputs, in its forward's order
INPUTS = ("input_ids", "attention_mask", "pos", "targets", "cands", "weight", "train", "fixed",
          "k1", "k2", "scale")
VOCAB_CHUNK = 4096          # vocabulary rows per chunk of the streamed head (language modelling)
_C0 = int(noise._mix32(torch.tensor(0x9E3779B9)))  # mix32(hi ^ 0x9E3779B9) at hi = 0


def bucket(n: int, least: int = 1) -> int:
    """`n` rounded up to a power of two (at least `least`): the fixed shapes a program has."""
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def default_cache() -> Path:
    """``$POCKETLLM_CACHE/programs``, default ``~/.cache/pocketllm/programs``."""
    return Path(os.environ.get("POCKETLLM_CACHE") or "~/.cache/pocketllm").expanduser() / "programs"


# ----------------------------------------------------------------------------- the noise

def shift_op(x: torch.Tensor, s: int) -> torch.Tensor:
    """x >> s (ONNX: a BitShift; its exporter lowers a floor division through float32)."""
    return x >> s


def shift_div(x: torch.Tensor, s: int) -> torch.Tensor:
    """x >> s for x >= 0 as a floor division (ExecuTorch: `>>` on a scalar is no core ATen op,
    so the edge dialect refuses it; integer division runs on the portable kernels)."""
    return torch.div(x, 1 << s, rounding_mode="floor")


def program_hash(k: torch.Tensor, tensor_id: torch.Tensor, index: torch.Tensor,
                 shr=shift_op) -> torch.Tensor:
    """zo/noise.py's h(k, i) (W, P) int64 for 32-bit key words `k` (W, n), element p being
    element `index[p]` (< 2**32: the high word is 0) of tensor `tensor_id[p]`."""
    a = noise._mix32(k ^ _C0, shr)                # (W, n) subkeys of (k, hi = 0)
    b = noise._mix32(a ^ 0x85EBCA6B, shr)
    return noise._hash_lo(index[None], a[:, tensor_id], b[:, tensor_id], shr)


def program_noise(k1: torch.Tensor, k2: torch.Tensor, tensor_id: torch.Tensor,
                  index: torch.Tensor, dist: str, shr=shift_op) -> torch.Tensor:
    """z (W, P) float32 for W key lists: element p of the flat vector is element `index[p]` of
    trainable tensor `tensor_id[p]`, whose key is (k1, k2)[:, tensor_id[p]] (the key's low and
    high 32-bit words, (W, n) int64). `zo/noise.py`'s hash in int64 ops (indices < 2**32, so
    the high word is 0 and each key has one pair of subkeys): rademacher bit for bit, gaussian
    with float32 log/cos (the reference's float64 differs by ~1e-6). `shr`: how the
    backend shifts (`shift_op`, `shift_div`: the same bits)."""
    def h(k):
        return program_hash(k, tensor_id, index, shr)
    h1 = h(k1)
    if dist == "rademacher":
        return (1 - 2 * shr(h1, 31)).to(torch.float32)
    u1 = (shr(h1, 8) + 1).to(torch.float32) * 2.0**-24
    u2 = shr(h(k2), 8).to(torch.float32) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


# ----------------------------------------------------------------------------- the program

@dataclass(frozen=True)
class Shapes:
    """One program's fixed shapes: W replicas of a B x T batch, N scored positions, C label
    words per position (0: the whole vocabulary)."""

    W: int
    B: int
    T: int
    N: int
    C: int


def stores_tables(scheme: str) -> bool:
    """Whether a program on a `scheme` base stores its embedding table and head as int8 rows:
    as the torch scheme of that name does (`quantize.Scheme.tables`)."""
    return scheme != "none" and SCHEMES[scheme].tables


def below(weight: str, first: int) -> bool:
    """Whether the frozen Linear whose weight buffer is `weight` (a `StepProgram`'s
    `l{i}_{proj}`, as an exporter names it: `b_l3_q_proj`, `l3_q_proj`) sits in a layer below
    `first`, the first with a trained tensor. Its input is the same in every replica, so a
    quantizer may round its activations there (a dynamic int8 scheme): a rounding step is the
    base's own error, alike in every replica, while in a layer a perturbation reaches it moves
    replicas' losses apart by far more than the eps-sized differences the estimate reads
    (benchmarks/results/quant_fd_noise.md)."""
    m = re.fullmatch(r"(?:b_)?l(\d+)_\w+", weight)
    return m is not None and int(m.group(1)) < first


class StepProgram(nn.Module):
    """The per-replica losses of a batch under perturbed LoRA adapters (see the module's
    docstring). Frozen weights are buffers (constants of the exported program); the tied
    embedding is stored once and serves as the head."""

    def __init__(self, model: nn.Module, trained: list[str], dist: str, shapes: Shapes,
                 shr=shift_op, tables: bool = False):
        """`tables`: the embedding table (the tied head) and an untied head stored as int8
        rows (`quantize.Int8Rows`, as the torch schemes store them), for a quantized base."""
        super().__init__()
        cfg = model.config
        self.dist, self.shapes, self.shr = dist, shapes, shr
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        base = model.model
        table = Int8Rows.of if tables else FloatRows
        self.embed = table(base.embed_tokens.weight.detach().float())
        head = model.get_output_embeddings().weight
        self.tied = head is base.embed_tokens.weight
        if not self.tied:
            self.head = table(head.detach().float())
        self.eps = base.norm.variance_epsilon
        self.register_buffer("norm", base.norm.weight.detach().float(), persistent=False)
        # RoPE at positions 0..T-1, from the model's own rotary module (the same float32 values)
        pos = torch.arange(shapes.T)[None]
        x = torch.zeros(1, shapes.T, self.head_dim)
        cos, sin = base.rotary_emb(x, pos)
        self.register_buffer("cos", cos[0].float(), persistent=False)
        self.register_buffer("sin", sin[0].float(), persistent=False)
        causal = torch.tril(torch.ones(shapes.T, shapes.T, dtype=torch.bool))
        self.register_buffer("causal", causal, persistent=False)
        # the LoRA tensors: each (A or B) is a slice of the trained flat vector or the fixed one
        self.slices: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        offsets = {"train": 0, "fixed": 0}
        tid, idx = [], []
        lora = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        order = [n for n in trained] + [f"{m}.{f}" for m in lora for f in ("lora_A", "lora_B")
                                         if f"{m}.{f}" not in trained]
        named = dict(model.named_parameters())
        for name in order:
            which = "train" if name in trained else "fixed"
            shape = tuple(named[name].shape)
            n = named[name].numel()
            self.slices[name] = (which, offsets[which], shape)
            offsets[which] += n
            if which == "train":
                tid.append(torch.full((n,), len(tid), dtype=torch.int64))
                idx.append(torch.arange(n, dtype=torch.int64))
        self.n_train, self.n_fixed = offsets["train"], offsets["fixed"]
        # the layers below the first trained one run on the batch once, not per replica
        self.first = first_trained_layer(model, trained) or 0
        self.register_buffer("tensor_id", torch.cat(tid), persistent=False)
        self.register_buffer("index", torch.cat(idx), persistent=False)
        # the layers' frozen weights, by module name
        self.layers = []
        for i, layer in enumerate(base.layers):
            names = {}
            for part, mods in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                               ("mlp", ("gate_proj", "up_proj", "down_proj"))):
                for m in mods:
                    full = f"model.layers.{i}.{part}.{m}"
                    mod = getattr(getattr(layer, part), m)
                    lin = mod.base_layer if isinstance(mod, LoRALinear) else mod
                    key = f"l{i}_{m}"
                    self.register_buffer(key, lin.weight.detach().float(), persistent=False)
                    if lin.bias is not None:
                        self.register_buffer(key + "_b", lin.bias.detach().float(),
                                             persistent=False)
                    names[m] = (key, full if isinstance(mod, LoRALinear) else None,
                                getattr(mod, "scaling", 0.0), lin.bias is not None)
            self.register_buffer(f"l{i}_in", layer.input_layernorm.weight.detach().float(),
                                 persistent=False)
            self.register_buffer(f"l{i}_post",
                                 layer.post_attention_layernorm.weight.detach().float(),
                                 persistent=False)
            self.layers.append(names)

    # ---- pieces -------------------------------------------------------------------------
    def _rms(self, x, w):
        v = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(v + self.eps))

    def _tensor(self, name, train, fixed, W):
        which, off, shape = self.slices[name]
        n = math.prod(shape)
        if which == "train":
            return train[:, off:off + n].reshape(W, *shape)
        return fixed[off:off + n].reshape(1, *shape)

    def _linear(self, x, spec, train, fixed, W):
        key, lora, scaling, has_bias = spec
        y = F.linear(x, getattr(self, key), getattr(self, key + "_b") if has_bias else None)
        if lora is None:
            return y
        A = self._tensor(lora + ".lora_A", train, fixed, W)
        Bm = self._tensor(lora + ".lora_B", train, fixed, W)
        G = max(A.shape[0], Bm.shape[0])
        if A.shape[0] == 1:  # a shared (frozen) A, as LoRALinear.forward_groups
            xa = F.linear(x, A[0]).reshape(G, -1, A.shape[1])
        else:
            xa = torch.bmm(x.reshape(G, -1, x.shape[-1]), A.transpose(1, 2))
        d = torch.bmm(xa, Bm.transpose(1, 2).expand(G, -1, -1))
        return y + d.reshape(y.shape) * scaling

    def _attention(self, x, spec, mask, train, fixed, W):
        R, T, _ = x.shape
        hd = self.head_dim
        q = self._linear(x, spec["q_proj"], train, fixed, W).view(R, T, -1, hd).transpose(1, 2)
        k = self._linear(x, spec["k_proj"], train, fixed, W).view(R, T, -1, hd).transpose(1, 2)
        v = self._linear(x, spec["v_proj"], train, fixed, W).view(R, T, -1, hd).transpose(1, 2)
        half = hd // 2

        def rope(t):
            rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
            return t * self.cos + rot * self.sin
        q, k = rope(q), rope(k)
        rep = self.n_heads // self.n_kv  # each kv head serves `rep` consecutive query heads
        if rep > 1:
            k = k[:, :, None].expand(R, self.n_kv, rep, T, hd).reshape(R, self.n_heads, T, hd)
            v = v[:, :, None].expand(R, self.n_kv, rep, T, hd).reshape(R, self.n_heads, T, hd)
        scores = torch.matmul(q, k.transpose(2, 3)) * (hd ** -0.5) + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        out = out.transpose(1, 2).reshape(R, T, -1)
        return self._linear(out, spec["o_proj"], train, fixed, W)

    def _mlp(self, x, spec, train, fixed, W):
        g = self._linear(x, spec["gate_proj"], train, fixed, W)
        u = self._linear(x, spec["up_proj"], train, fixed, W)
        return self._linear(F.silu(g) * u, spec["down_proj"], train, fixed, W)

    # ---- the program ----------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, pos, targets, cands, weight, train, fixed,
                k1, k2, scale):
        """Per-replica losses (W,): `input_ids`/`attention_mask` (B, T) int64; the scored
        positions `pos` (N,) as flat indices into B x T, their `targets` (N,) (an index into
        `cands` (N, C), or a token id when C = 0) and loss weights `weight` (N,); the trained
        flat vector `train` (P,) and the fixed LoRA tensors `fixed` (F,); per replica the keys'
        words `k1`, `k2` (W, n) and `scale` (W,) (sign * eps; 0: unperturbed)."""
        W = scale.shape[0]
        z = program_noise(k1, k2, self.tensor_id, self.index, self.dist, self.shr)
        flat = train[None] + z * scale[:, None]                       # (W, P)
        h = self._scored_hidden(input_ids, attention_mask, pos, flat, fixed, W)
        head = self.embed if self.tied else self.head
        if self.shapes.C:  # the label words' rows only
            logits = self._label_logits(h, cands, head)                # (N, W, C)
            nll = torch.logsumexp(logits, -1) - logits.gather(
                2, targets[:, None, None].expand(-1, W, 1)).squeeze(2)
            nll = nll.transpose(0, 1)                                  # (W, N)
        else:  # the whole vocabulary, streamed: a running max and sum per row
            hf = h.reshape(W * h.shape[1], -1)
            run_max, run_sum, _ = self._streamed_head(hf, head)
            tgt = (h * head.rows(targets)[None]).sum(-1).reshape(-1)
            nll = (run_max + torch.log(run_sum) - tgt).view(W, -1)
        return (nll * weight[None]).sum(1)

    def _scored_hidden(self, input_ids, attention_mask, pos, flat, fixed, W):
        """The final-normed hidden states (W, N, H) at the scored positions `pos` of the W
        replicas (replica r's LoRA tensors: row r of `flat`, and `fixed`)."""
        B, T = input_ids.shape
        x = self.embed.rows(input_ids)                               # (B, T, H)
        keep = self.causal[None] & attention_mask[:, None, :].bool()  # (B, T, T)
        mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None]
        for i, spec in enumerate(self.layers):
            if i == self.first:  # below it every replica computes the same: once (zo/shared.py)
                H = x.shape[-1]
                x = x[None].expand(W, B, T, H).reshape(W * B, T, H)
                mask = mask[None].expand(W, B, 1, T, T).reshape(W * B, 1, T, T)
            x = x + self._attention(self._rms(x, getattr(self, f"l{i}_in")), spec, mask,
                                    flat, fixed, W)
            x = x + self._mlp(self._rms(x, getattr(self, f"l{i}_post")), spec, flat, fixed, W)
        x = self._rms(x, self.norm)
        return x.reshape(W, B * T, -1)[:, pos]                        # (W, N, H)

    @staticmethod
    def _label_logits(h, cands, head):
        """(N, W, C) logits of each scored position's candidate words `cands` (N, C)."""
        rows = head.rows(cands)                                       # (N, C, H)
        return torch.bmm(h.transpose(0, 1), rows.transpose(1, 2))

    @staticmethod
    def _streamed_head(hf, head, argmax: bool = False):
        """Over the whole vocabulary in VOCAB_CHUNK-row chunks, never (rows, vocab) logits:
        each row's running max and sum of exp (its log-sum-exp = max + log(sum)) and, with
        `argmax`, the first token with the largest logit (int64; else None)."""
        run_max = hf.new_full((hf.shape[0],), -1e30)
        run_sum = hf.new_zeros((hf.shape[0],))
        best = torch.zeros(hf.shape[0], dtype=torch.int64) if argmax else None
        for v0 in range(0, head.shape[0], VOCAB_CHUNK):
            lg = hf @ head.block(v0, min(v0 + VOCAB_CHUNK, head.shape[0])).T
            top = lg.amax(1)
            if argmax:  # strictly larger: an earlier chunk keeps a tie, as torch.argmax
                best = torch.where(top > run_max, lg.argmax(1) + v0, best)
            m = torch.maximum(run_max, top)
            run_sum = run_sum * torch.exp(run_max - m) + torch.exp(lg - m[:, None]).sum(1)
            run_max = m
        return run_max, run_sum, best


# an EvalProgram's inputs, in its forward's order
EVAL_INPUTS = ("input_ids", "attention_mask", "pos", "targets", "cands", "train", "fixed")


class EvalProgram(StepProgram):
    """What evaluation reads of a batch at the current LoRA tensors (no perturbation, one
    replica), so that a run through an engine evaluates without the torch model: a
    classification program returns the label words' logits (N, C) at the scored positions
    (the host takes the cross-entropy and the argmax, as `objectives.classification`); a
    language-modelling one returns per scored position the loss over the whole vocabulary
    (N,), the argmax token (N,) int64, and the hidden state (N, H) (a closed label set's
    choice is scored from it on the host, from the few head rows it needs)."""

    def forward(self, input_ids, attention_mask, pos, targets, cands, train, fixed):
        h = self._scored_hidden(input_ids, attention_mask, pos, train[None], fixed, 1)
        head = self.embed if self.tied else self.head
        if self.shapes.C:
            return self._label_logits(h, cands, head)[:, 0]            # (N, C)
        hf = h[0]
        run_max, run_sum, best = self._streamed_head(hf, head, argmax=True)
        nll = run_max + torch.log(run_sum) - (hf * head.rows(targets)).sum(-1)
        return nll, best, hf


# what a ProgramEngine exports, by kind: the step's forward passes, evaluation
PROGRAMS = {"step": StepProgram, "eval": EvalProgram}


# ----------------------------------------------------------------------------- host side

def program_inputs(model_batch: dict, kind_rows: bool, shapes: Shapes, pad_id: int = 0):
    """The batch-dependent inputs of a program with `shapes`, from an objective's batch: the
    rows and sequence padded to the bucket, the scored positions listed with weights summing
    to 1 (a classification's rows, a language-modelling batch's label tokens)."""
    ids, am = model_batch["input_ids"], model_batch["attention_mask"]
    b, t = ids.shape
    B, T, N = shapes.B, shapes.T, shapes.N
    input_ids = torch.full((B, T), pad_id, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.int64)
    input_ids[:b, :t], mask[:b, :t] = ids, am
    pos = torch.zeros(N, dtype=torch.int64)
    targets = torch.zeros(N, dtype=torch.int64)
    weight = torch.zeros(N, dtype=torch.float32)
    cands = torch.zeros(N, max(shapes.C, 1), dtype=torch.int64)
    if kind_rows:
        n = b
        pos[:n] = torch.arange(b) * T + model_batch["answer_pos"]
        targets[:n] = model_batch["class_label"]
        cands[:n] = model_batch["label_ids"]
    else:
        sel = model_batch["labels"][:, 1:] != IGNORE_INDEX           # position t predicts t+1
        r, c = torch.nonzero(sel, as_tuple=True)
        n = r.numel()
        pos[:n] = r * T + c
        targets[:n] = model_batch["labels"][:, 1:][sel]
    weight[:n] = 1.0 / max(n, 1)
    return [input_ids, mask, pos, targets, cands, weight]


def fixed_lora(model: nn.Module, trained: list[str]) -> list[torch.Tensor]:
    """The LoRA tensors a program reads but does not train (LoRA-FA's A), in its order."""
    lora = {f"{n}.{f}": getattr(m, f) for n, m in model.named_modules()
            if isinstance(m, LoRALinear) for f in ("lora_A", "lora_B")}
    return [p for n, p in lora.items() if n not in trained]


def flat_state(trained: list[torch.Tensor], fixed: list[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A program's `train` and `fixed` inputs: the tensors flat, float32, in order (fixed:
    one 0 when there is none; an input is never empty)."""
    train = torch.cat([p.data.reshape(-1) for p in trained]).float()
    fixed = torch.cat([p.data.reshape(-1) for p in fixed]).float() if fixed else torch.zeros(1)
    return train, fixed


def scored(batch: dict, kind_rows: bool) -> int:
    if kind_rows:
        return batch["input_ids"].shape[0]
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(tensors) -> str:
    """A fingerprint of the frozen weights a program bakes in (two models with one config but
    other weights must not share a program)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        if t.numel():  # the tensor's own bytes (a copy would stay in the heap: +1x the model)
            h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


class ProgramCache:
    """Exported programs on disk, one file per key plus a record of its digest: an entry whose
    record is missing, for other versions, or whose file does not match it is rebuilt."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_cache()

    def get(self, key: dict, suffix: str, build) -> tuple[Path, float]:
        """The program file for `key` (built by `build(path)` unless a valid entry exists);
        the seconds spent building (0: from the cache)."""
        key = json.loads(json.dumps(key, sort_keys=True))  # as the record holds it (no tuples)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = self.root / f"{name}{suffix}"
        record = self.root / f"{name}.json"
        if path.exists() and record.exists():
            try:
                meta = json.loads(record.read_text())
                if meta.get("key") == key and meta.get("sha256") == file_digest(path):
                    return path, 0.0
            except (OSError, ValueError):
                pass  # an unreadable record: rebuilt below
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        build(tmp)
        os.replace(tmp, path)  # whole or absent: a killed export leaves no half file
        record.write_text(json.dumps({"key": key, "sha256": file_digest(path)}))
        return path, time.perf_counter() - t0


class ProgramEngine(Engine):
    """An engine that runs a `StepProgram` exported to a runtime (the subclass's `compile`,
    `load`, `run`); the trainable tensors and their seeded updates stay on the host."""

    extra = "?"        # the pip extra that installs the runtime
    suffix = ".bin"
    modules: tuple[str, ...] = ()  # what must import for the runtime to work
    shr = staticmethod(shift_op)   # how its programs shift integers
    settings = ("program_cache",)
    architectures = ("llama",)  # the functional forward of `StepProgram`
    trainables = ("lora",)      # LoRA A and B, or B alone (LoRA-FA)
    objectives = ("classification", "lm")
    schemes: tuple[str, ...] = ()  # quantized bases the backend's `compile` builds

    def __init__(self, model, params, stats, dist="gaussian", perturbation=None,
                 program_cache=None, threads=0, quantize="none"):
        super().__init__(model, params, stats, dist, perturbation)
        self.check(model, params, stats, perturbation, f"--engine {self.name}")
        self.load_scheme(quantize)  # refuses a scheme the backend does not build
        self.quantize = quantize
        self.tables = stores_tables(quantize)
        objective = getattr(stats, "__self__", None)
        self.rows_kind = getattr(objective, "name", "?") == "classification"
        self.objective = objective
        self.cache = ProgramCache(program_cache)
        self.threads = threads or torch.get_num_threads()
        self.trained = [n for n, _ in params]
        self.first = first_trained_layer(model, self.trained)  # (StepProgram shares below it)
        self.fixed_params = fixed_lora(model, self.trained)
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0
        frozen = [t for n, t in model.state_dict().items() if ".lora_" not in n]
        self.model_key = {"config": model.config.to_json_string(use_diff=False),
                          "weights": weights_digest(frozen)}
        # a closed label set's head rows (language modelling): all evaluation needs of the
        # head outside the programs, kept before the frozen weights are released
        choices = getattr(objective, "choices", None)
        rows = (None if choices is None else
                model.get_output_embeddings().weight[choices].detach().clone())
        # (rows quantize one by one: the programs' int8 head rows, dequantized, exactly)
        self.choice_rows = Int8Rows.of(rows).dequantized() if self.tables and \
            rows is not None else rows
        self.runners: dict[tuple[str, Shapes], object] = {}
        self.release = False       # release_model(): the frozen weights live in the programs
        self.frozen_file: Path | None = None  # where they are kept once released
        self.width = 1  # replicas per program call (`losses`)
        self.export_seconds = 0.0
        self.pending: list[tuple[list[int], float]] = []

    @classmethod
    def check(cls, model, params, stats, perturbation, flag: str,
              instead: str = "use --engine torch") -> None:
        """Refuse (ValueError naming `flag`, SystemExit for a missing runtime) what a
        `StepProgram` cannot run: the engine's constructor, and `export --trainable`."""
        for mod in cls.modules:
            try:
                __import__(mod)
            except ImportError:
                raise SystemExit(f"error: {flag} needs its runtime: "
                                 f"pip install pocketllm[{cls.extra}]") from None
        arch = getattr(model.config, "model_type", "?")
        if arch not in cls.architectures:
            raise ValueError(f"{flag} runs {', '.join(cls.architectures)} models, not {arch}: "
                             f"{instead}")
        if perturbation is not None and perturbation.spec().get("name") != "dense":
            raise ValueError(f"{flag} draws dense noise only, not --zo-perturbation "
                             f"{perturbation.spec().get('name')}: {instead}")
        not_lora = [n for n, _ in params if not n.endswith((".lora_A", ".lora_B"))]
        if not_lora:
            raise ValueError(f"{flag} trains LoRA tensors only (--trainable lora), not "
                             f"{not_lora[0]}: {instead}")
        from ..quantize import quantized_layers
        if quantized_layers(model):  # (a scheme of `schemes` is built from the float model)
            raise ValueError(f"{flag} exports a float model: load it without --quantize-base "
                             f"(the engine quantizes its programs itself), or {instead}")
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise ValueError(f"{flag} runs a float32 model: use --dtype float32")
        kind = getattr(getattr(stats, "__self__", None), "name", "?")
        if kind not in cls.objectives:
            raise ValueError(f"{flag} scores the {' and '.join(cls.objectives)} objectives, "
                             f"not {kind}: {instead}")
        if any(p.numel() >= 2**32 for _, p in params):
            raise ValueError(f"{flag}: a trainable tensor of 2**32 elements or more")

    # ---- the backend (class methods: they export and run any module, e.g. a test's) --------
    @classmethod
    @abstractmethod
    def compile(cls, module: nn.Module, inputs: dict[str, torch.Tensor], path: Path,
                quantize: str = "none") -> None:
        """Export `module` (traced at the named `inputs`, in its forward's order) to `path`,
        its frozen base Linears stored in `quantize` (a scheme of `schemes`)."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path, threads: int):
        """A runner for the program at `path` on `threads` threads."""

    @classmethod
    @abstractmethod
    def run(cls, runner, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The program's outputs for the named `inputs`."""

    @staticmethod
    @abstractmethod
    def versions() -> dict[str, str]:
        """The versions a cached program depends on."""

    @classmethod
    def code_digest(cls) -> str:
        """The source that builds the programs (this module and the backend's): a cached
        program exported by other code is stale, so it is part of the key."""
        import inspect
        import sys
        h = hashlib.sha256()
        for mod in (sys.modules[__name__], sys.modules[cls.__module__]):
            h.update(Path(inspect.getfile(mod)).read_bytes())
        return h.hexdigest()[:16]

    # ---- programs ------------------------------------------------------------------------------
    def shapes(self, batch) -> Shapes:
        b, t = batch["input_ids"].shape
        limit = getattr(self.model.config, "max_position_embeddings", 1 << 30)
        C = batch["label_ids"].shape[1] if self.rows_kind else 0
        return Shapes(W=self.width, B=bucket(b), T=min(bucket(t, MIN_SEQ), max(t, limit)),
                      N=bucket(scored(batch, self.rows_kind)), C=C)

    def runner(self, shapes: Shapes, example: dict[str, torch.Tensor], kind: str = "step"):
        if (kind, shapes) not in self.runners:
            key = {"model": self.model_key, "shapes": asdict(shapes), "dist": self.dist,
                   "trained": [(n, list(p.shape)) for n, p in self.params],
                   "fixed": [list(p.shape) for p in self.fixed_params],
                   "torch": torch.__version__, "engine": self.name, **self.versions(),
                   "code": self.code_digest()}
            if kind != "step":  # (a step program: no kind in its key)
                key["kind"] = kind
            if self.first:  # (programs that replicate every layer: none)
                key["shared"] = self.first
            if self.quantize != "none":
                key["quantize"] = self.quantize
                key["tables"] = "int8-rows" if self.tables else "float"
                if self.quantize == "int8-dynamic":  # activations rounded below it only
                    key["dynamic_below"] = self.first or 0

            def build(path):
                with self._weights():
                    prog = PROGRAMS[kind](self.model, self.trained, self.dist, shapes,
                                          self.shr, self.tables).eval()
                    with torch.no_grad():
                        self.compile(prog, example, path, self.quantize)
                    del prog  # its buffers are the frozen weights: released below
            path, took = self.cache.get(key, self.suffix, build)
            self.export_seconds += took
            # each loaded program holds the frozen weights: training's and evaluation's
            # programs are not kept loaded together (a phase change reloads from the cache)
            other = [k for k in self.runners if k[0] != kind]
            for k in other:
                del self.runners[k]
            self._release()  # before the program loads: the weights are never held twice
            try:
                runner = self.load(path, self.threads)
            except Exception:  # a file that passed its digest but will not load: rebuild once
                path.unlink(missing_ok=True)
                path, took = self.cache.get(key, self.suffix, build)
                self.export_seconds += took
                runner = self.load(path, self.threads)
            self.runners[kind, shapes] = runner
        return self.runners[kind, shapes]

    # ---- the torch model's frozen weights ----------------------------------------------------
    def release_model(self) -> None:
        self.release = True

    def _frozen(self) -> list[tuple[nn.Module, str, str]]:
        """(module, parameter name, full name) of every frozen parameter of the model (tied
        ones once per module that holds them)."""
        return [(mod, n, f"{mname}.{n}" if mname else n)
                for mname, mod in self.model.named_modules()
                for n, p in mod._parameters.items()
                if p is not None and n not in ("lora_A", "lora_B")]

    def _released(self) -> bool:
        return any(m._parameters[n].is_meta for m, n, _ in self._frozen())

    def _release(self) -> None:
        """With `release_model`: the frozen weights saved once to the program cache (keyed by
        their digest, checked like a program), then replaced in the model by shapes without
        storage (the meta device), their memory handed back to the OS. `_weights` brings them
        back for exporting a program of a shape not seen yet."""
        if not self.release or self._released():
            return
        if self.frozen_file is None:
            state = {full: m._parameters[n].detach() for m, n, full in self._frozen()}
            self.frozen_file, _ = self.cache.get({"model": self.model_key, "kind": "frozen"},
                                                 ".pt", lambda path: torch.save(state, path))
            del state
        memo: dict[int, nn.Parameter] = {}  # a tied weight stays one parameter
        for mod, n, _ in self._frozen():
            p = mod._parameters[n]
            mod._parameters[n] = memo.setdefault(
                id(p), nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
        memo.clear()
        memory.trim_heap()  # the freed weights sat in the heap (smaller than mmap's threshold)

    @contextmanager
    def _weights(self):
        """Within the block the model holds its frozen weights (mapped from the file
        `_release` wrote, read as the export touches them); released again after it."""
        if not self._released():
            yield
            return
        state = torch.load(self.frozen_file, mmap=True, weights_only=True)
        memo: dict[int, nn.Parameter] = {}
        for mod, n, full in self._frozen():
            p = mod._parameters[n]
            mod._parameters[n] = memo.setdefault(
                id(p), nn.Parameter(state[full], requires_grad=False))
        del state, memo
        try:
            yield
        finally:
            self._release()

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return flat_state([p for _, p in self.params], self.fixed_params)

    def _evaluate(self, batch, keys: list[list[int]], scales: list[float]) -> list[float]:
        if len(scales) > self.width:  # a pass wider than the program: in chunks
            w = self.width
            return [v for i in range(0, len(scales), w)
                    for v in self._evaluate(batch, keys[i:i + w], scales[i:i + w])]
        shapes = self.shapes(batch)
        n = len(self.params)
        pad = shapes.W - len(scales)
        keys = [list(k) for k in keys] + [[0] * n] * pad
        kt = torch.tensor([[int(k) & 0xFFFFFFFF for k in ks] for ks in keys], dtype=torch.int64)
        k2 = torch.tensor([[int(k) >> 32 for k in ks] for ks in keys], dtype=torch.int64)
        scale = torch.tensor(list(scales) + [0.0] * pad, dtype=torch.float32)
        train, fixed = self._flat()
        inputs = program_inputs(batch, self.rows_kind, shapes, self.pad_id)
        inputs += [train, fixed, kt, k2, scale]
        inputs = dict(zip(INPUTS, inputs))
        out = self.run(self.runner(shapes, inputs), inputs)[0]
        return out[:len(scales)].double().tolist()

    # ---- the Engine interface --------------------------------------------------------------------
    def losses(self, batch, plan: Plan) -> torch.Tensor:
        self.sync()
        # one program width for the run: the widest pass yet (a step's plan is the same every
        # step); a narrower pass is padded with unperturbed replicas, whose losses are dropped
        self.width = max(self.width, max(len(p) for p in plan.passes))
        out = torch.empty(len(plan.replicas), dtype=torch.float64)
        n = len(self.params)
        for idx in plan.passes:
            reps = [plan.replicas[i] for i in idx]
            if len({r.anchor for r in reps}) > 1:
                raise ValueError("a forward pass mixes replicas at the anchor and at the current "
                                 "weights (plan.group_passes keeps them apart)")
            keys = [plan.keys[r.query] if r.query >= 0 else [0] * n for r in reps]
            # f32(sign * eps), as the torch engine's kernel rounds the scale
            scales = [float(torch.tensor(r.sign * plan.eps, dtype=torch.float32)) for r in reps]
            if reps[0].anchor:
                with self.at_anchor():
                    got = self._evaluate(batch, keys, scales)
            else:
                got = self._evaluate(batch, keys, scales)
            for i, v in zip(idx, got):
                out[i] = v
        return out

    def loss(self, batch) -> float:
        self.sync()
        return self._evaluate(batch, [[0] * len(self.params)], [0.0])[0]

    def scorer(self, repeated: bool = False):
        return self.eval_stats

    def eval_stats(self, batch) -> TokenStats:
        """The objective's `stats(model, batch)` at the current weights, through an
        `EvalProgram` (the torch model's frozen weights are not read)."""
        self.sync()
        b = batch["input_ids"].shape[0]
        shapes = dataclasses.replace(self.shapes(batch), W=1)
        inputs = program_inputs(batch, self.rows_kind, shapes, self.pad_id)
        del inputs[INPUTS.index("weight")]
        inputs = dict(zip(EVAL_INPUTS, [*inputs, *self._flat()]))
        out = self.run(self.runner(shapes, inputs, "eval"), inputs)
        if self.rows_kind:
            return class_result(out[0][:b].float(), batch["class_label"])
        sel = batch["labels"][:, 1:] != IGNORE_INDEX   # as program_inputs lists them
        rows, tgt = sel.nonzero()[:, 0], batch["labels"][:, 1:][sel]
        n = rows.numel()
        nll, pred, h = out[0][:n].float(), out[1][:n], out[2][:n].float()
        return self.objective.row_stats(b, rows, nll, (pred == tgt).float(), h, tgt,
                                        lambda hf: hf @ self.choice_rows.T)

    def apply(self, updates) -> None:
        self.pending += [(list(k), c) for k, c in updates if c != 0.0]

    def sync(self) -> None:
        # on the host, with zo.noise: the same bits as the torch engine's fused update
        with torch.no_grad():
            for keys, coef in self.pending:
                for (_, p), k in zip(self.params, keys):
                    noise.add_noise_(p.data, k, 0, coef, self.dist)
        self.pending = []
