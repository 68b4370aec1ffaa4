"""kill -9 a training run at an arbitrary moment; --resume must reach the same final weights."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).parent / "pocketllm")


def _args(out, method, trainable, iters):
    return [EXE, "train", "--model", "tiny-llama", "--data", str(ROOT / "examples" / "personal"),
            "--method", method, "--trainable", trainable, "--iters", str(iters),
            "--batch-size", "2", "--max-seq-length", "128", "--steps-per-eval", "0",
            "--val-batches", "1", "--save-every", "7", "--adapter-path", str(out),
            "--learning-rate", "1e-3" if trainable == "lora" else "1e-4", "--threads", "1",
            *EXTRA.get(method, [])]


# a stateful ZO optimizer (its state rebuilt by replaying the log), P-RGE queries, schedules;
# LoRA runs also keep their best adapter, which must come out the same
KEEP = ["--keep-best", "--steps-per-eval", "5"]
EXTRA = {"prge": ["--queries", "2", "--zo-optimizer", "adam", "--lr-schedule", "cosine",
                  "--eps-schedule", "linear", *KEEP], "lora-adam": KEEP}


def _weights(out: Path, trainable: str) -> dict:
    f = out / "adapter_model.safetensors" if trainable == "lora" else out / "model" / "model.safetensors"
    return load_file(str(f))


def _steps_done(out: Path) -> int:
    m = out / "metrics.jsonl"
    return m.read_text().count('"loss"') if m.exists() else 0


@pytest.mark.parametrize("method,trainable", [("zo-sgd", "lora"), ("zo-sgd", "full"),
                                              ("lora-adam", "lora"), ("adam", "full"),
                                              ("prge", "lora")])
def test_kill_and_resume_equals_uninterrupted(tmp_path, method, trainable):
    iters = 60
    ref = tmp_path / "ref"
    subprocess.run(_args(ref, method, trainable, iters), check=True, capture_output=True)

    out = tmp_path / "killed"
    for kill_after in (9, 23):  # killed twice, at moments that depend on scheduling
        p = subprocess.Popen(_args(out, method, trainable, iters) + (["--resume"] if kill_after == 23 else []),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _steps_done(out) < kill_after and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert 0 < _steps_done(out) < iters, "the run ended before it could be killed"
    r = subprocess.run(_args(out, method, trainable, iters) + ["--resume"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a, b = _weights(ref, trainable), _weights(out, trainable)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if "--keep-best" in EXTRA.get(method, []):
        from pocketllm.train import read_best
        assert read_best(out / "best") == read_best(ref / "best") is not None
        a, b = _weights(ref / "best", trainable), _weights(out / "best", trainable)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
