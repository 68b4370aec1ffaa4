"""Every registered method trains and resumes exactly.

(a) a short run with fixed seeds lowers the loss of a fixed batch on tiny-llama, through the
    driver the loop uses (`Method.steps`) and scored the way the loop evaluates (inside
    `Method.evaluating`: a split-mode method's side network attached);
(b) through the CLI, a run interrupted after half its steps and `--resume`d ends with the same
    saved weights, bit for bit, and the same per-step losses as an uninterrupted run.

Parametrized over `pocketllm.methods.REGISTRY` and each method's `trainable_kinds`: a new method
is tested by being registered. `SHORT` holds tuned short runs of the methods there are; one not
in it runs at its own defaults for more steps (`FALLBACK`). A method whose settings name a
server (`--server`, `--token-file`: split mode) gets a real `pocketllm serve` on loopback
(tests/split/harness.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from pathlib import Path

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.loss import group_losses
from pocketllm.methods import REGISTRY, build, get_method
from pocketllm.models import load_model
from pocketllm.trainable import complete
from tests.helpers import TEXTS, score, tiny_batch, write_data

# (method, trainable) -> (learning rate, steps, the method's settings): a short run that lowers
# the fixed batch's loss by MARGIN (figures of tests/methods/test_methods.py and test_prge.py)
SHORT = {
    ("zo-sgd", "lora"): (2e-2, 60, {"eps": 1e-2}),
    ("zo-sgd", "full"): (1e-3, 40, {"eps": 1e-3}),
    # the small sets: the norms' scales of a random model barely move its loss (a large rate),
    # and 8 virtual tokens change it by about 0.1 at most (backprop's floor): more steps
    ("zo-sgd", "norm"): (2.0, 40, {"eps": 1e-2}),
    ("zo-sgd", "prefix"): (3e-2, 150, {"eps": 1e-2}),
    ("prge", "lora"): (2e-2, 30, {"queries": 4}),
    ("lora-adam", "lora"): (1e-2, 20, {}),
    ("lora-adam", "norm"): (3e-2, 20, {}),
    ("lora-adam", "prefix"): (1e-2, 20, {}),
    ("adam", "full"): (1e-3, 10, {}),
    ("side", "full"): (1e-2, 20, {"side_width": 16}),
}
MARGIN = 0.05
# a method not in SHORT: its own default learning rate (0: resolved from `defaults`) and
# settings, for more steps, and any decrease beyond rounding
FALLBACK = (0.0, 100, {})
FALLBACK_MARGIN = 1e-3

# --resume: stateful updates where a method has them (their state must come back too)
RESUME_FLAGS = {"zo-sgd": ["--zo-optimizer", "momentum"],
                "prge": ["--queries", "2", "--zo-optimizer", "adam"],
                "side": ["--side-width", "8"]}
ITERS = 8


def _cases() -> list[tuple[str, str]]:
    """(method, trainable) for every registered method and trainable set it takes; a method
    that leaves the model frozen once (its trainable set is moot)."""
    out = []
    for name, cls in sorted(REGISTRY.items()):
        kinds = cls.trainable_kinds if cls.trains_model else cls.trainable_kinds[:1]
        out += [(name, kind) for kind in kinds]
    return out


CASES = _cases()


def _needs_server(name: str) -> bool:
    fields = {f.name for f in dataclasses.fields(get_method(name).Config)}
    return {"server", "token_file"} <= fields


@pytest.fixture(scope="module")
def split_server(tmp_path_factory):
    """A `pocketllm serve` process and its token file, started only if a method asks."""
    from tests.split.harness import Server
    root = tmp_path_factory.mktemp("split")
    token = root / "token"
    token.write_text(secrets.token_hex(16) + "\n")
    s = Server(root / "state", token).start()
    yield s.address, token
    s.stop()


def _server_settings(request, name: str) -> dict:
    if not _needs_server(name):
        return {}
    address, token = request.getfixturevalue("split_server")
    return {"server": address, "token_file": str(token)}


def test_short_runs_name_registered_methods():
    assert {m for m, _ in SHORT} <= set(REGISTRY), "SHORT lists a method that is not registered"
    assert {m for m in RESUME_FLAGS} <= set(REGISTRY)
    assert {"zo-sgd", "prge", "lora-adam", "adam", "side"} <= set(REGISTRY)


# ---- (a) a short run lowers the loss of a fixed batch ---------------------------------------
@pytest.mark.parametrize("name,trainable", CASES)
def test_a_short_run_lowers_the_loss_of_a_fixed_batch(name, trainable, request, tmp_path):
    lr, steps, settings = SHORT.get((name, trainable), FALLBACK)
    margin = MARGIN if (name, trainable) in SHORT else FALLBACK_MARGIN
    settings = {**settings, **_server_settings(request, name)}
    cls = get_method(name)
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, TEXTS)
    run = TrainArgs(model="tiny-llama", method=name, trainable=trainable, seed=3, lora_rank=4,
                    learning_rate=lr)
    complete(run, list(zip(b["input_ids"].tolist(), [0] * len(TEXTS))))  # head: the batch's
    _, params = cls.trainable(model, run)
    m = build(name, model, params, run, **settings)

    def loss() -> float:
        with m.evaluating(), torch.no_grad():
            return group_losses(score(model, b), 1).item()

    try:
        before = loss()
        m.open_log(tmp_path, fresh=True)
        done = []
        for step, res in m.steps(lambda s: [b], 0, steps, lambda s: (run.learning_rate, None)):
            assert math.isfinite(res.loss) and res.forward_passes > 0
            done.append(step)
        assert done == list(range(1, steps + 1))
        after = loss()
    finally:
        m.close()
    assert after < before - margin, (name, trainable, before, after)


# ---- (b) an interrupted, resumed run equals an uninterrupted one ----------------------------
RECORDS = [("Ran 5 km on the trail this morning.", " health"),
           ("Paid the rent and the power bill.", " money"),
           ("Sam picks the kids up on Friday.", " family"),
           ("Permit submittal for the park is due.", " work"),
           ("Knee ached on the last hill.", " health"),
           ("Budget review with the bank.", " money"),
           ("Bedtime stories all week.", " family"),
           ("Site survey notes to redo.", " work")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"),
                      [(f"Note: {t}\nCategory:", c) for t, c in RECORDS])


def _train(out: Path, data: Path, name: str, trainable: str, iters: int, extra: list[str]) -> None:
    from pocketllm.cli import main
    rc = main(["train", "--model", "tiny-llama", "--data", str(data), "--method", name,
               "--trainable", trainable, "--iters", str(iters), "--batch-size", "2",
               "--max-seq-length", "64", "--lora-rank", "4", "--steps-per-eval", "0",
               "--no-eval-before", "--val-batches", "1", "--eval-batch-size", "2",
               # an interrupted run evaluates (and may keep a best/ adapter) where it stopped
               "--no-keep-best",
               "--save-every", "3", "--threads", "1", "--adapter-path", str(out), *extra])
    assert rc == 0


def _step_losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def _same(a, b) -> bool:
    """Equal bit for bit: tensors, and dicts / lists / scalars of them (a checkpoint)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _saved(out: Path) -> dict[str, object]:
    """What the run saved that holds tensors: weights (*.safetensors) and checkpoints (*.pt)."""
    from safetensors.torch import load_file
    found = {str(p.relative_to(out)): load_file(str(p)) for p in out.rglob("*.safetensors")}
    found.update({str(p.relative_to(out)): torch.load(p, weights_only=True)
                  for p in out.rglob("*.pt")})
    return found


@pytest.mark.parametrize("name,trainable", CASES)
def test_resume_equals_an_uninterrupted_run(name, trainable, request, tmp_path, data_dir,
                                            capsys):
    server = _server_settings(request, name)
    extra = [*RESUME_FLAGS.get(name, []),
             *(a for k, v in server.items() for a in ("--" + k.replace("_", "-"), v))]
    ref, cut = tmp_path / "uninterrupted", tmp_path / "interrupted"
    _train(ref, data_dir, name, trainable, ITERS, extra)
    _train(cut, data_dir, name, trainable, ITERS // 2, extra)
    capsys.readouterr()
    _train(cut, data_dir, name, trainable, ITERS, [*extra, "--resume"])
    assert f"resumed from {cut} at step {ITERS // 2}" in capsys.readouterr().out

    assert _step_losses(cut) == _step_losses(ref)
    assert [s for s, _ in _step_losses(ref)] == list(range(1, ITERS + 1))
    a, b = _saved(ref), _saved(cut)
    assert any(k.endswith(".safetensors") for k in a), f"{name} saved no weights"
    assert a.keys() == b.keys()
    for k in a:
        assert _same(a[k], b[k]), k
