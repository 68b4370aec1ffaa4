"""A quantized frozen base (`--quantize-base`): the model's frozen Linear weights stored in 8 or
4 bits while the trained set (a LoRA adapter, norm scales, a prompt) stays float.

Zeroth-order training only runs the base forward, so quantizing it costs nothing but the
model's own quantization error: the estimate, the ZO log and the optimizer are unchanged, and
the adapter is trained against the weights the phone will actually hold.

    none          float weights
    int8          torchao Int8WeightOnlyConfig: per-channel int8 weights, float activations
    int8-dynamic  torchao Int8DynamicActivationInt8WeightConfig: int8 weights, activations
                  quantized per token at run time (int8 x int8 matmul)
    int4          4-bit weights, two per byte, asymmetric per group of 128 (64, 32 where the
                  input width needs it), through torch's own CPU int4 kernel
                  (aten._weight_int4pack_mm_for_cpu); bfloat16 activations in that matmul

Why int4 is not torchao's: in torchao 0.18 on x86 CPU, Int4WeightOnlyConfig needs the `mslk`
package (plain format) or CUDA (tile-packed), and IntxWeightOnlyConfig(weight_dtype=int4) runs
but stores each 4-bit value in an int8 (IntxUnpackedToInt8Tensor: int8's memory); its packed
formats need torchao's ARM kernel library. The aten kernel stores the packed nibbles.

Every scheme but `none` also stores the embedding table as int8 rows with a float32 scale each
(`Int8Rows`), and the output head with it: a tied head is the same table (stored once), which
the streamed loss reads a chunk of rows at a time, dequantizing each (SmolLM2-135M's 49152 x
576 table: 27 MB instead of 113 MB in float32). What stays float: norms, position embeddings,
an embedding that is not a plain nn.Embedding (Gemma's scaled one, and the head tied to it),
GPT-2's Conv1D layers, and the trained set. A scheme is one entry of `SCHEMES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

NONE = "none"


class QuantizeError(ValueError):
    """A scheme that cannot run here (its message says what to install or choose)."""


# ---- int4: packed nibbles, torch's CPU kernel -------------------------------------------------
INT4_GROUPS = (128, 64, 32)  # the group size: the largest that divides the input width


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4 bits: (q - 8) * scale + zero per group of `group` inputs
    (the tinygemm convention aten's CPU kernel reads); q packed two per byte. The matmul runs
    in bfloat16 (activations rounded to it, accumulation in float32 inside the kernel)."""

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.group = group
        # the kernel computes in bfloat16 (its float32 path is scalar code, ~150x slower:
        # 0.93 s against 6 ms for 256 x 576 x 1536 on one thread); scales in that dtype
        qdtype = torch.bfloat16
        wg = w.reshape(self.out_features, -1, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((wg - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15)
        q = q.to(torch.int32).reshape(self.out_features, self.in_features)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (in/group, out, 2): the kernel's layout of (scale, zero) per group and output
        sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", sz.to(qdtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales_zeros.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group,
                                                         self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, in float (tests, export)."""
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group,
                                                            self.scales_zeros).T.float()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, 4-bit, group {self.group}"


# ---- int8 rows: the embedding table and the output head -----------------------------------------
TABLE_CHUNK = 1024  # rows quantized (and dequantized for a head's full logits) at a time


def quantize_rows(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D tensor: (q int8 in [-qmax, qmax], scale
    (rows, 1) float32 with max |row| -> qmax); x ~ q * scale. The int8 table here and split
    mode's activations on the wire (`split.quant`) both use it."""
    x = x.detach().float()
    scale = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax).to(torch.int8), scale


class Int8Rows(nn.Module):
    """A (rows, cols) table stored as int8 rows, each with its own float32 scale (symmetric:
    max |row| -> 127), read a few rows or a block of rows at a time, dequantized to `dtype`.
    The embedding table (and with tied embeddings the output head, the same table) of a
    quantized base: SmolLM2-135M's 49152 x 576 takes 27 MB instead of 113 MB in float32."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype):
        """An empty table (`set_rows` fills it); `Int8Rows.of(weight)` quantizes a weight."""
        super().__init__()
        self.dtype = dtype  # what reads return: the float model's dtype
        self.register_buffer("q", torch.empty(rows, cols, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(rows, 1, dtype=torch.float32))

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Int8Rows":
        table = cls(*weight.shape, weight.dtype)
        for r0 in range(0, weight.shape[0], TABLE_CHUNK):  # no float copy of the whole table
            table.set_rows(r0, weight[r0:r0 + TABLE_CHUNK])
        return table

    @torch.no_grad()
    def set_rows(self, r0: int, w: torch.Tensor) -> None:
        """Quantize the float rows `w` into rows r0:r0 + len(w)."""
        q, sc = quantize_rows(w, 127)
        self.q[r0:r0 + w.shape[0]] = q
        self.scale[r0:r0 + w.shape[0]] = sc

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) -> (*ids.shape, cols), dequantized."""
        return (self.q[ids].to(torch.float32) * self.scale[ids]).to(self.dtype)

    def block(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1, dequantized (what the streamed head loss reads, chunk by chunk)."""
        return self.q[r0:r1].to(torch.float32).mul_(self.scale[r0:r1]).to(self.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.block(0, self.shape[0])

    def extra_repr(self) -> str:
        return f"{self.shape[0]} x {self.shape[1]}, int8 rows, a float32 scale each"


class FloatRows(nn.Module):
    """A float (rows, cols) table read as `Int8Rows` is (`rows`, `block`, `shape`): an engine
    program's embedding table and head on a float base (the model's tensor, not a copy)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("w", weight, persistent=False)

    @property
    def shape(self) -> torch.Size:
        return self.w.shape

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.w)

    def block(self, r0: int, r1: int) -> torch.Tensor:
        return self.w[r0:r1]


class Int8Embedding(nn.Module):
    """nn.Embedding over an `Int8Rows` table: looks up int8 rows and dequantizes them."""

    def __init__(self, table: Int8Rows, padding_idx: int | None = None):
        super().__init__()
        self.table, self.padding_idx = table, padding_idx
        self.num_embeddings, self.embedding_dim = table.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table in float: a new copy each time, for readers that need one (the hot
        paths read `table` a block at a time)."""
        return self.table.dequantized()


class Int8Head(nn.Module):
    """The output head (logits = h W^T + b) over an `Int8Rows` table, which a tied head shares
    with the embedding (stored once). `forward` (a model's full logits: eval, generate)
    dequantizes TABLE_CHUNK rows at a time; the losses read `table` through `loss.PlainHead`."""

    def __init__(self, table: Int8Rows, bias: torch.Tensor | None = None):
        super().__init__()
        self.table = table
        self.out_features, self.in_features = table.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h.new_empty(*h.shape[:-1], self.out_features)
        for r0 in range(0, self.out_features, TABLE_CHUNK):
            r1 = min(r0 + TABLE_CHUNK, self.out_features)
            out[..., r0:r1] = h @ self.table.block(r0, r1).to(h.dtype).T
        return out if self.bias is None else out.add_(self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table in float (a new copy each time; see `Int8Embedding.weight`)."""
        return self.table.dequantized()


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if m is old and name:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)


def is_table(model: nn.Module, module: nn.Module) -> bool:
    """`module` is one `quantize_table` stores as int8 rows: the model's input embedding (a
    plain nn.Embedding) or its untied output head (a plain nn.Linear); not a subclass (Gemma's
    scaled embedding) nor a head tied to a table that stays float."""
    emb, head = _tables(model)
    return ((module is emb and type(emb) is nn.Embedding)
            or (module is head and type(head) is nn.Linear and not _tied(emb, head)))


def quantize_table(model: nn.Module, module: nn.Module,
                   table: Int8Rows | None = None) -> bool:
    """Store `module` as int8 rows in place, if `is_table` (else False, left float): its
    weight's rows, or `table` if given (the streamed load fills it a chunk at a time, never
    holding the float table); a tied head is replaced by a head over the same table."""
    if not is_table(model, module):
        return False
    emb, head = _tables(model)
    table = table if table is not None else Int8Rows.of(module.weight)
    if module is emb:
        tied = _tied(emb, head)
        _replace(model, emb, Int8Embedding(table, emb.padding_idx))
        if tied and type(head) is nn.Linear:
            _replace(model, head, Int8Head(table, head.bias))
    else:
        _replace(model, head, Int8Head(table, head.bias))
    return True


def _tables(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return emb, head


def _stored(m: nn.Module | None):
    """What `m` stores its rows in: its int8 table or its weight (never the float copy an
    int8 module's `weight` would make)."""
    return m.table if isinstance(m, (Int8Embedding, Int8Head)) else getattr(m, "weight", None)


def _tied(emb: nn.Module | None, head: nn.Module | None) -> bool:
    return emb is not None and head is not None and _stored(head) is _stored(emb)


def base_tables(model: nn.Module) -> list[tuple[int, int]]:
    """(rows, cols) of the tables a scheme with `tables` stores as int8 rows (the embedding,
    and an untied output head): what the memory estimate counts."""
    emb, head = _tables(model)
    tied = _tied(emb, head)
    out = [tuple(emb.weight.shape)] if type(emb) is nn.Embedding else []
    if type(head) is nn.Linear and not tied:
        out.append(tuple(head.weight.shape))
    return out


def quantize_tables(model: nn.Module) -> int:
    """`quantize_table` on the embedding and the output head (a tied head with its table)."""
    emb, head = _tables(model)
    n = quantize_table(model, emb) if emb is not None else False
    head = _tables(model)[1]
    return int(n) + int(type(head) is nn.Linear and quantize_table(model, head))


def _int4(linears: list[nn.Linear]) -> list[nn.Module | None]:
    out: list[nn.Module | None] = []
    for m in linears:
        group = int4_group(m.in_features)
        out.append(None if group is None else Int4Linear(m, group))  # None: left float
    return out


def _torchao(config: Callable[[], object]) -> Callable[[list[nn.Linear]], list]:
    """A scheme through torchao's `quantize_` (the module stays an nn.Linear; its weight
    becomes torchao's quantized tensor)."""
    def run(linears: list[nn.Linear]) -> list:
        try:
            from torchao.quantization import quantize_
        except ImportError:
            raise QuantizeError("--quantize-base int8 needs torchao: pip install "
                                "pocketllm[quant]") from None
        cfg = config()
        for m in linears:
            quantize_(m, cfg)
        return list(linears)
    return run


def _int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig()


def _int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    return Int8DynamicActivationInt8WeightConfig()


def int4_group(in_features: int) -> int | None:
    """The group size a 4-bit layer of this input width gets (None: it stays float)."""
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int  # bits per quantized weight
    describe: str
    apply: Callable[[list[nn.Linear]], list]  # Linears -> their replacements (None: kept)
    # scale (and zero) numbers per weight row: per row (int8), per group (int4: 2 per group)
    scales: Callable[[int], float] = lambda in_features: 1
    scale_bytes: int = 0  # bytes per scale (0: the run's dtype's)
    # the embedding table and the output head (tied: one table) stored as int8 rows
    tables: bool = True
    # rounds the activations at every call: in a layer a zeroth-order perturbation reaches,
    # the replicas' losses then differ by rounding more than by eps x the gradient
    rounds_activations: bool = False

    def nbytes(self, out_features: int, in_features: int, bpe: int) -> int:
        """Bytes of an (out, in) Linear weight stored in this scheme (`bpe`: bytes of the run's
        dtype, which the float weights and scales take): the memory estimate's."""
        if self.name == NONE or (self.bits == 4 and int4_group(in_features) is None):
            return out_features * in_features * bpe
        per_scale = self.scale_bytes or bpe
        return int(out_features * (in_features * self.bits / 8
                                   + self.scales(in_features) * per_scale))

    def table_nbytes(self, rows: int, cols: int, bpe: int) -> int:
        """Bytes of an embedding table / output head (`Int8Rows` if the scheme has `tables`)."""
        return rows * (cols + 4) if self.tables else rows * cols * bpe


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme(NONE, 32, "float weights", lambda linears: list(linears), tables=False),
    Scheme("int8", 8, "int8 weights per channel, float activations (torchao)",
           _torchao(_int8_weight_only)),
    Scheme("int8-dynamic", 8, "int8 weights, int8 activations per token (torchao)",
           _torchao(_int8_dynamic), rounds_activations=True),
    Scheme("int4", 4, "4-bit weights per group of 128, packed (aten's CPU int4 kernel)", _int4,
           scales=lambda in_features: 2 * in_features / int4_group(in_features), scale_bytes=2),
)}


def check_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise QuantizeError(f"--quantize-base {name!r}: choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def base_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the Linears a quantized base stores quantized: every nn.Linear but the
    output head (and anything sharing the embedding's weight). Quantized at load, before the
    trained set is chosen: a run that trains these weights (--trainable full) is refused."""
    emb, head = _tables(model)
    keep = {id(_stored(head)), id(_stored(emb))}
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and m is not head and id(m.weight) not in keep]


def quantize_modules(model: nn.Module, named: list[tuple[str, nn.Linear]], scheme: str) -> int:
    """Quantize the Linears `named` (from `base_linears`) in place; how many were."""
    s = check_scheme(scheme)
    if s.name == NONE or not named:
        return 0
    done = 0
    for (name, old), new in zip(named, s.apply([m for _, m in named])):
        if new is None:
            continue
        done += 1
        if new is not old:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return done


def quantize_base(model: nn.Module, scheme: str) -> int:
    """Store `model`'s base Linear weights in `scheme` and, if the scheme says so, its embedding
    table and output head as int8 rows (see the module docstring); returns the number of
    layers quantized (`models.load_model(..., quantize=)` calls it)."""
    n = quantize_modules(model, base_linears(model), scheme)
    if check_scheme(scheme).tables:
        n += quantize_tables(model)
    _trim()  # the float weights just freed go back to the OS
    return n


def quantized_layers(model: nn.Module) -> int:
    """How many of `model`'s layers hold quantized weights (of any scheme)."""
    return sum(1 for m in model.modules()
               if isinstance(m, (Int4Linear, Int8Embedding, Int8Head))
               or (type(m) is nn.Linear and type(m.weight) not in (torch.Tensor, nn.Parameter)))


def own_memory(model: nn.Module) -> None:
    """Copy the float tensors left (embeddings, norms) into memory of their own. A model loaded
    from safetensors keeps them in the file's mapping, which stays mapped (and every page the
    quantization read stays resident, the whole float model) while any tensor points into it."""
    import gc
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:  # (tied weights: once)
            if type(t) in (torch.Tensor, nn.Parameter) and not t.is_meta:
                t.data = t.data.clone()
    gc.collect()
    _trim()


def _trim() -> None:
    from .memory import trim_heap
    trim_heap()
