"""Keep transformers from importing optional packages for features pocketllm does not use.

When transformers is imported it asks, for each optional package, whether it is installed, and
imports the ones it finds for integrations of its own: torchao (its `TorchAoConfig` quantizer)
and scipy (the Hungarian matching of its object-detection losses). pocketllm uses neither through
transformers (`--quantize-base` calls torchao itself), yet every process paid for both: measured
with transformers 5.24 / torch 2.13, `import transformers.models.llama.modeling_llama` peaks at
381 MB against 334 MB when transformers sees neither (torch alone: 218 MB).

`install()` (called by pocketllm's own entry points, `cli.main` and `workload.main`, before
transformers is imported; never by `import pocketllm`, so a program that uses pocketllm as a
library keeps transformers' integrations as they are) adds an import hook that
patches transformers' own availability check, once its module is loaded, to answer "not
installed" for `HIDDEN`. Only transformers' check is changed: the packages stay importable by
anyone else (pocketllm.quantize imports torchao when a torchao scheme runs). If transformers was
imported first, or its check is renamed, nothing changes but the memory.
POCKETLLM_LEAN_IMPORT=0 turns it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

# optional packages transformers would import for features pocketllm does not use
HIDDEN = ("torchao", "scipy")
_TARGET = "transformers.utils.import_utils"  # where transformers' availability check lives


def _patch(module) -> None:
    check = getattr(module, "_is_package_available", None)
    if check is None or getattr(check, "_pocketllm", False):
        return

    def is_package_available(pkg_name: str, return_version: bool = False):
        if pkg_name in HIDDEN:
            return (False, "N/A") if return_version else (False, None)
        return check(pkg_name, return_version)

    is_package_available._pocketllm = True
    module._is_package_available = is_package_available


class _Hook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' import_utils is about to be loaded, wraps its
    loader so that the module is patched right after it runs (before any check is made)."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        uninstall()  # once: the module is loaded once per process
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


_hook = _Hook()


def install() -> bool:
    """Add the hook unless transformers is already imported or POCKETLLM_LEAN_IMPORT=0; True if
    it is (or already was) in place."""
    if os.environ.get("POCKETLLM_LEAN_IMPORT", "1") == "0" or _TARGET in sys.modules:
        return False
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
    return True


def uninstall() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
