"""pocketllm keeps transformers from importing torchao and scipy (lean_import.py), without
making them unimportable for anyone else."""

import importlib.util
import subprocess
import sys
import types

from pocketllm import lean_import


def test_patch_answers_not_installed_for_the_hidden_packages_only():
    calls = []

    def check(pkg_name, return_version=False):
        calls.append(pkg_name)
        return (True, "9.9") if return_version else (True, None)

    mod = types.SimpleNamespace(_is_package_available=check)
    lean_import._patch(mod)
    assert mod._is_package_available("torchao", return_version=True) == (False, "N/A")
    assert mod._is_package_available("scipy")[0] is False
    assert mod._is_package_available("numpy", return_version=True) == (True, "9.9")
    assert calls == ["numpy"]  # the hidden ones never reach the real check
    lean_import._patch(mod)  # twice: wrapped once
    assert mod._is_package_available("numpy")[0] is True and calls == ["numpy", "numpy"]


_PROBE = """
import sys, pocketllm
if sys.argv[2] == "entry":  # what `pocketllm ...` / `python -m pocketllm.workload` do first
    from pocketllm import lean_import
    lean_import.install()
import transformers.modeling_utils
from transformers.utils import import_utils
print(sorted({'torchao', 'scipy'} & set(sys.modules)), import_utils.is_torchao_available(),
      import_utils.is_scipy_available())
if sys.argv[1] == "ao":  # still importable by pocketllm (--quantize-base int8)
    import torchao.quantization
    print('torchao', 'torchao' in sys.modules)
"""


def _probe(mode: str) -> list[str]:
    has_ao = importlib.util.find_spec("torchao") is not None  # the [quant] extra
    out = subprocess.run([sys.executable, "-c", _PROBE, "ao" if has_ao else "-", mode],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def test_transformers_imported_after_pocketllms_entry_point_imports_neither():
    lines = _probe("entry")
    assert lines[0] == "[] False False"
    if importlib.util.find_spec("torchao") is not None:
        assert lines[1] == "torchao True"


def test_a_library_import_of_pocketllm_leaves_transformers_as_it_is():
    # a program that imports pocketllm and uses transformers' own torchao integration keeps it
    lines = _probe("library")
    installed = [str(importlib.util.find_spec(p) is not None) for p in ("torchao", "scipy")]
    assert lines[0].split("] ")[1].split() == installed
