"""Building a model one layer at a time, each base Linear quantized as soon as it is filled
(`--quantize-base`): the peak is the quantized model plus one float layer, not the float model.

`build_streamed(config, dtype, fill, scheme)` allocates the modules without initialising them
(pages never written are not resident), then walks them in order: `fill` writes a module's own
parameters, the module is quantized if it is a base Linear, and its float weight is freed before
the next. `safetensors_fill(directory)` is the `fill` of a Hugging Face directory: each tensor
read from its file with plain reads (not a mapping, whose pages would stay resident).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .base import ModelError, ModelSource, Source, auto_class, hf_tokenizer, loading, local_config, wrap

# a filler: (the parameter's full name, its tensor, its module) -> writes the values in place
Fill = Callable[[str, torch.Tensor, nn.Module], None]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of `config` in `dtype`, allocated but not initialised (HF's init skipped; the
    weights' pages are not resident until written), its head tied as the config says."""
    from transformers.initialization import no_init_weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = auto_class(config).from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # init_weights (skipped above) is what normally ties the head
    return model


def fill_streamed(model: nn.Module, fill: Fill, scheme: str = "none") -> nn.Module:
    """Fill `model` (from `empty_model`) module by module with `fill`; with a quantization
    `scheme`, each base Linear is quantized right after it is filled and its float weight
    returned to the OS, and so is the embedding table (and an untied head) if the scheme
    stores them as int8 rows. A tied weight is filled once."""
    from ..memory import trim_heap
    from ..quantize import (TABLE_CHUNK, Int8Rows, base_linears, check_scheme, is_table,
                            quantize_modules, quantize_table)
    quantized = {id(m): (n, m) for n, m in base_linears(model)} if scheme != "none" else {}
    tables = check_scheme(scheme).tables
    seen: set[int] = set()
    with torch.no_grad():
        # by name, not a list of modules: a quantized layer's float module must not stay alive
        for name in [n for n, _ in model.named_modules()]:
            mod = model.get_submodule(name)
            if tables and hasattr(fill, "rows") and is_table(model, mod):
                # the table a chunk of rows at a time, each quantized as it is read: its float
                # weight (allocated, never written) is never resident
                w = mod.weight
                seen.add(id(w))
                table = Int8Rows(*w.shape, w.dtype)
                for r0 in range(0, w.shape[0], TABLE_CHUNK):
                    part = w.new_empty(min(TABLE_CHUNK, w.shape[0] - r0), w.shape[1])
                    fill.rows(f"{name}.weight" if name else "weight", part, r0)
                    table.set_rows(r0, part)
                _fill_own(name, mod, fill, seen)  # (a bias)
                quantize_table(model, mod, table)
                del mod, w, table, part
                trim_heap()
                continue
            _fill_own(name, mod, fill, seen)
            if id(mod) in quantized:  # (popped: no reference to its float weight is left)
                quantize_modules(model, [quantized.pop(id(mod))], scheme)
                trim_heap()
            elif tables and quantize_table(model, mod):  # the embedding (a tied head with it)
                del mod
                trim_heap()
    return model


def _fill_own(name: str, mod: nn.Module, fill: Fill, seen: set[int]) -> None:
    # (a function: no loop variable keeps the last float weight alive once it is quantized)
    for attr, p in mod.named_parameters(recurse=False):
        if id(p) not in seen:
            seen.add(id(p))
            fill(f"{name}.{attr}" if name else attr, p, mod)


class SafetensorsFill:
    """Fills parameters from the *.safetensors files of a directory, read with plain reads."""

    def __init__(self, directory: str | Path, prefix: str = ""):
        self.index: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        self.prefix = prefix  # the model's base_model_prefix: checkpoints store keys with or without it
        for path in sorted(Path(directory).glob("*.safetensors")):
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for key, v in header.items():
                if key == "__metadata__":
                    continue
                if v["dtype"] not in _DTYPES:
                    raise KeyError(f"{path.name}: {key}: dtype {v['dtype']} not read here")
                start, end = v["data_offsets"]
                self.index[key] = (path, _DTYPES[v["dtype"]], v["shape"], 8 + n + start,
                                   end - start)
        if not self.index:
            raise KeyError(f"{directory}: no .safetensors file")

    def key(self, name: str) -> str:
        if name in self.index:
            return name
        p = self.prefix + "."
        alt = name[len(p):] if name.startswith(p) else p + name
        if alt in self.index:
            return alt
        raise KeyError(f"{name} is in none of the checkpoint's files")

    def __call__(self, name: str, t: torch.Tensor, module: nn.Module | None = None) -> None:
        path, dtype, shape, offset, nbytes = self.index[self.key(name)]
        if list(shape) != list(t.shape):
            raise KeyError(f"{name}: shape {shape} in the file, {list(t.shape)} in the model")
        self._read(path, name, offset, nbytes, dtype, t)

    def rows(self, name: str, t: torch.Tensor, r0: int) -> None:
        """Rows r0:r0 + len(t) of the 2-d tensor `name` into `t` (a table read in chunks)."""
        path, dtype, shape, offset, nbytes = self.index[self.key(name)]
        if len(shape) != 2 or shape[1] != t.shape[1] or r0 + t.shape[0] > shape[0]:
            raise KeyError(f"{name}: shape {shape} in the file, rows {r0}:{r0 + t.shape[0]} "
                           f"of {t.shape[1]} columns asked")
        row = nbytes // shape[0]
        self._read(path, name, offset + r0 * row, t.shape[0] * row, dtype, t)

    @staticmethod
    def _read(path: Path, name: str, offset: int, nbytes: int, dtype: torch.dtype,
              t: torch.Tensor) -> None:
        # straight into t when the file holds its dtype; else through one raw buffer
        direct = t.dtype == dtype and t.is_contiguous()
        raw = (t.detach().view(-1).view(torch.uint8) if direct
               else torch.empty(nbytes, dtype=torch.uint8))
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(raw.numpy()) != nbytes:
                raise KeyError(f"{path.name}: {name} is cut short")
        if not direct:
            t.copy_(raw.view(dtype).reshape(t.shape))


def load_dir_streamed(directory: str, dtype: torch.dtype, scheme: str) -> Any:
    """The model of a Hugging Face directory, read layer by layer and quantized as it goes.
    KeyError if its checkpoint does not name every parameter the way the model does (the
    caller then loads it whole)."""
    config = local_config(directory)
    model = empty_model(config, dtype)
    fill = SafetensorsFill(directory, getattr(model, "base_model_prefix", ""))
    names = {n for n, _ in model.named_parameters()}  # (tied: once)
    for n in names:
        fill.key(n)  # every parameter is there, before anything is read
    return fill_streamed(model, fill, scheme)


def load_dir_quantized(source: Source, src: ModelSource, directory: str, dtype: torch.dtype,
                       scheme: str):
    """A Hugging Face directory's model with its base Linears in `scheme`, read layer by layer
    and quantized as it goes (`stream.load_dir_streamed`: the peak is the quantized model's);
    a checkpoint whose names or files it cannot read that way is loaded whole, then quantized
    (`Source.load_quantized`)."""
    try:
        with loading(src, "weights"):
            model = load_dir_streamed(directory, dtype, scheme)
    except ModelError as e:
        if not isinstance(e.__cause__, KeyError):
            raise
        return Source.load_quantized(source, src, dtype, scheme)
    try:
        tokenizer = hf_tokenizer(directory, local=True)
    except Exception as e:
        raise wrap(src, "tokenizer", e) from e
    return model, tokenizer
