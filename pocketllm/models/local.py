"""A path to a local Hugging Face model directory (one holding ``config.json``)."""
from __future__ import annotations

from typing import Any

import torch

from .base import (PATH_EXPECTED, ModelError, ModelSource, Source, as_path, finish_tokenizer, hf_tokenizer,
                   load_dir, loading, local_config)
from .stream import load_dir_quantized


class LocalDirSource(Source):
    kind = "local-dir"

    def expected(self) -> str:
        return PATH_EXPECTED

    def match(self, name: str) -> ModelSource | None:
        path = as_path(name)
        if path is None:
            return None
        if (path / "config.json").is_file():
            return ModelSource(kind=self.kind, name=name, path=str(path))
        # Say what the directory is instead, when it is something else people pass by mistake.
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

    def describe(self, src: ModelSource) -> str:
        return f"model directory {src.path}"

    def load(self, src: ModelSource, dtype: torch.dtype):
        return load_dir(src, src.path, dtype)

    def load_quantized(self, src: ModelSource, dtype: torch.dtype, scheme: str):
        return load_dir_quantized(self, src, src.path, dtype, scheme)

    def config(self, src: ModelSource, name: str) -> Any:
        return local_config(src.path)

    def tokenizer(self, src: ModelSource):
        with loading(src, "tokenizer"):
            return finish_tokenizer(hf_tokenizer(src.path, local=True))
