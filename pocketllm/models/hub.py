"""A hub id ``org/name``: the local Hugging Face cache first; otherwise the hub, but only after a
probe of a few seconds says it is reachable, so a machine without internet gets an actionable
error instead of minutes of retries."""
from __future__ import annotations

import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from .base import (ModelError, ModelSource, Source, finish_tokenizer, hf_model, hf_tokenizer, load_dir, loading,
                   local_config, wrap)

_HUB_PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+")


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


def probe(url: str, timeout: float = _HUB_PROBE_TIMEOUT_S) -> str | None:
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
    why = probe(endpoint)
    if why is not None:
        raise ModelError(
            f"cannot download {repo_id!r}: the Hugging Face hub is not reachable from this machine. "
            f"{_download_hint(repo_id)}. (Probe of {endpoint}: {why}{extra}.)"
        )


class HubSource(Source):
    kind = "hub"

    def expected(self) -> str:
        return "a Hugging Face hub id of the form 'org/name'"

    def match(self, name: str) -> ModelSource | None:
        if not _HUB_ID.fullmatch(name):
            return None
        snapshot = _hub_snapshot(name)
        return ModelSource(kind=self.kind, name=name, path=snapshot, cached=snapshot is not None)

    def describe(self, src: ModelSource) -> str:
        return f"hub model {src.name!r}" + (f" (cached at {src.path})" if src.path else "")

    def load(self, src: ModelSource, dtype: torch.dtype):
        cached_error = None
        if src.path is not None:
            try:
                return load_dir(src, src.path, dtype)
            except ModelError as e:  # e.g. a partial snapshot: complete it from the hub if reachable
                cached_error = e
        _check_hub_reachable(src.name, cached_error)
        try:
            model = hf_model(src.name, dtype, local=False)
            tokenizer = hf_tokenizer(src.name, local=False)
        except Exception as e:
            raise wrap(src, "model", e) from e
        return model, tokenizer

    def config(self, src: ModelSource, name: str) -> Any:
        if src.path is not None:
            return local_config(src.path)
        _check_hub_reachable(src.name, None)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(src.name)

    def tokenizer(self, src: ModelSource):
        with loading(src, "tokenizer"):
            cached_error = None
            if src.path is not None:
                try:
                    return finish_tokenizer(hf_tokenizer(src.path, local=True))
                except Exception as e:
                    cached_error = e
            _check_hub_reachable(src.name, cached_error)
            return finish_tokenizer(hf_tokenizer(src.name, local=False))
