import subprocess
import sys

import pytest

from pocketllm import memory


def _in_fresh_process(code: str, env_extra: dict | None = None) -> str:
    import os
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_allocator_applies_once_and_can_be_turned_off():
    code = "from pocketllm import memory; print(memory.tune_allocator(), memory.tune_allocator())"
    assert _in_fresh_process(code) == "True True"
    assert _in_fresh_process(code, {"POCKETLLM_MALLOC_TUNE": "0"}) == "False False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_limit_arenas_applies_and_can_be_turned_off():
    code = "from pocketllm import memory; print(memory.limit_arenas(1))"
    assert _in_fresh_process(code) == "True"
    assert _in_fresh_process(code, {"POCKETLLM_MALLOC_TUNE": "0"}) == "False"


def test_peak_is_at_least_current_rss():
    assert memory.peak_rss_mb() >= memory.rss_mb() * 0.99 > 0


def test_run_in_fresh_process_runs_the_workload_and_returns_its_json():
    # framework_mb falls back to a constant when the child fails, so the module path it starts
    # (memory.WORKLOAD, a string: no import to check it) is checked here
    r = memory.run_in_fresh_process("inference", model="tiny-llama", batch_size=1, seq=8,
                                    steps=1, warmup=0)
    assert r["method"] == "inference" and r["model"] == "tiny-llama"
    assert r["peak_run_mb"] > 0 and r["rss_loaded_mb"] > 0
    with pytest.raises(RuntimeError, match="--method"):
        memory.run_in_fresh_process("no-such-method")
