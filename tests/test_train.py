"""The training loop never saves a non-finite value: a step that overflows (here a learning rate
of 1e300, finite and accepted) stops the run with an error naming the step and what to change;
the adapter, checkpoint and ZO log on disk stay those of the last finite save, and `--resume`
with a sane rate continues from there."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from pocketllm.cli import main
from pocketllm.finite import first_nonfinite, is_finite
from tests.test_cli import DATA

BASE = ["train", "--model", "tiny-llama", "--data", DATA, "--batch-size", "2",
        "--max-seq-length", "128", "--val-batches", "1", "--steps-per-eval", "0",
        "--no-eval-before", "--steps-per-report", "1", "--save-every", "2"]
ADAPTER = "adapter_model.safetensors"
HUGE = "1e300"  # a finite rate (accepted) whose first update overflows float32 weights


def _run(out, method, iters, lr, *flags):
    return main([*BASE, "--method", method, "--iters", str(iters), "--learning-rate", lr,
                 "--adapter-path", str(out), *flags])


def _snapshot(out) -> dict[str, bytes]:
    """The files a resumed run reads its weights back from."""
    return {f.name: f.read_bytes() for f in out.iterdir()
            if f.name in (ADAPTER, "adapter_config.json", "checkpoint.pt")}


def _log_steps(out) -> int:
    return len((out / "zo_log.jsonl").read_text().splitlines()) - 1


@pytest.mark.parametrize("method,lr,iters,caught", [
    ("zo-sgd", HUGE, 5, "holds non-finite values"),       # by the final save's check
    ("zo-sgd", HUGE, 8, "the loss at the perturbed weights is [nan"),  # by the next step
    ("lora-adam", HUGE, 8, "AdamW's update at learning rate 1e+300 overflows"),
    ("lora-adam", "1e30", 8, "the training loss is nan"),  # huge finite weights, then NaN
])
def test_overflow_stops_the_run_and_keeps_the_last_finite_save(tmp_path, capsys, method, lr,
                                                               iters, caught):
    out = tmp_path / "run"
    assert _run(out, method, 4, "1e-3") == 0  # saved at steps 2 and 4
    before = _snapshot(out)
    capsys.readouterr()

    assert _run(out, method, iters, lr, "--resume") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]
    assert err.startswith("error: step ") and caught in err, err
    assert 5 <= int(err.split()[2].rstrip(":")) <= iters
    assert (f"training diverged; lower --learning-rate (now {float(lr):g}). Nothing non-finite "
            "was saved: --resume continues from step 4, the last save") in err
    # nothing was written after step 4: the saved files are byte for byte those of step 4
    assert _snapshot(out) == before
    assert all(is_finite(t) for t in load_file(str(out / ADAPTER)).values())
    if method == "zo-sgd":
        assert _log_steps(out) == 4  # the steps after the last save are forgotten
    for line in (out / "metrics.jsonl").read_text().splitlines():  # no NaN reported either
        assert all(math.isfinite(v) for v in json.loads(line).values()
                   if isinstance(v, float)), line

    # a sane rate continues from step 4 and finishes
    assert _run(out, method, 6, "1e-3", "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    assert all(is_finite(t) for t in load_file(str(out / ADAPTER)).values())
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    if method == "zo-sgd":
        assert _log_steps(out) == 6


def test_a_fresh_run_that_overflows_saves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "zo-sgd", 6, HUGE, "--save-every", "0", "--keep-best",
                "--steps-per-eval", "1") == 1
    err = capsys.readouterr().err
    assert "nothing was saved before it" in err and "Traceback" not in err
    assert not (out / ADAPTER).exists() and not (out / "best").exists()
    assert _log_steps(out) == 0


def test_first_nonfinite_names_the_tensor_and_sees_through_overflowing_sums():
    big = torch.full((1000,), 3e38)  # finite, but its float32 sum is inf
    assert is_finite(big) and is_finite(torch.zeros(0))
    assert first_nonfinite([("a", big), ("b", torch.ones(3))]) is None
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.ones(3 << 20)  # more than one chunk; the bad value in the last
        t[-1] = bad
        assert first_nonfinite([("a", big), ("b", t)]) == "b"
        assert not is_finite(t.to(torch.bfloat16))
