"""A new estimator, engine or method is one class plus one registry line: registered here (and
nowhere else), each is then a choice of `pocketllm train` with its own flags, and trains."""

import dataclasses
import json

import pytest
import torch

from pocketllm import engines
from pocketllm.cli import main
from pocketllm.config import opt
from pocketllm.engines.torch_engine import TorchEngine
from pocketllm.methods import REGISTRY as METHODS
from pocketllm.methods import Method, StepResult
from pocketllm.zo import estimators
from pocketllm.zo.plan import Replica
from tests.test_cli import FAST

RUN = [*FAST, "--iters", "3", "--steps-per-eval", "0", "--no-eval-before", "--save-every", "0"]


@pytest.fixture
def registered(monkeypatch):
    """Register a class under a name for one test (the registries are dicts)."""
    def add(registry, name, cls):
        monkeypatch.setitem(registry, name, cls)
        cls.name = name
        return cls
    return add


class ForwardDifference(estimators.Estimator):
    """One-sided: g_j = (L(w + eps z_j) - L(w)) / eps, the unperturbed loss shared."""

    def replicas(self):
        return [Replica(-1, 0.0)] + [Replica(j, 1.0) for j in range(self.queries)]

    def projected(self, losses, eps):
        return ((losses[1:] - losses[0]) / eps).tolist()


class CountingEngine(TorchEngine):
    calls = 0

    def losses(self, batch, plan):
        CountingEngine.calls += 1
        return super().losses(batch, plan)


@dataclasses.dataclass
class PlainSGDConfig:
    momentum: float = opt(0.0, "plain-sgd: heavy-ball momentum")


class PlainSGD(Method):
    """First-order SGD on the trainable tensors."""

    Config = PlainSGDConfig
    trainable_kinds = ("lora",)
    defaults = {"lora": {"learning_rate": 1e-2}}

    def __init__(self, model, params, cfg, run, objective):
        super().__init__(model, params, cfg, run, objective)
        for _, p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.SGD([p for _, p in params], lr=run.learning_rate,
                                   momentum=cfg.momentum)

    def step(self, batches, step, lr, eps=None):
        self.opt.zero_grad()
        total = sum(self.objective.n_scored(b) for b in batches)
        loss = sum(self.objective.stats(self.model, b).nll.sum() / total for b in batches)
        loss.backward()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        return StepResult(loss=loss.item(), tokens=total, forward_passes=len(batches))


def test_a_new_estimator_is_a_choice_of_train(registered, tmp_path):
    registered(estimators.REGISTRY, "forward-difference", ForwardDifference)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--method", "prge", "--queries", "2",
                 "--estimator", "forward-difference", "--adapter-path", str(out)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "forward_passes" in m]
    assert len(steps) == 3 and steps[-1]["forward_passes"] == 3 * 3  # 1 + q replicas a step


def test_a_new_engine_is_a_choice_of_train(registered, tmp_path):
    registered(engines.REGISTRY, "counting", CountingEngine)
    CountingEngine.calls = 0
    assert main(["train", *RUN, "--engine", "counting", "--adapter-path", str(tmp_path)]) == 0
    assert CountingEngine.calls == 3


def test_a_new_method_is_a_choice_of_train_with_its_own_flags(registered, tmp_path, capsys):
    registered(METHODS, "plain-sgd", PlainSGD)
    out = tmp_path / "run"
    assert main(["train", *RUN, "--method", "plain-sgd", "--momentum", "0.5",
                 "--adapter-path", str(out)]) == 0
    assert "momentum: 0.5" in (out / "config.yaml").read_text()
    assert (out / "adapter_model.safetensors").exists()
    # its flag is its own: another method refuses it
    with pytest.raises(SystemExit, match="--momentum is a setting of --method plain-sgd"):
        main(["train", *RUN, "--method", "zo-sgd", "--momentum", "0.5",
              "--adapter-path", str(tmp_path / "other")])
