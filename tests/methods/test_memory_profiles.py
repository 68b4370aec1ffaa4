"""Every registered method declares its memory profile and `pocketllm memory` estimates it
(parametrized over the registry: a new method is tested by being registered); prge's estimate
follows its replicas per forward."""

import re

import pytest

from pocketllm import memory_estimate as ME
from pocketllm.cli import main
from pocketllm.methods import REGISTRY, Method, get_method
from pocketllm.models import load_config

FRAMEWORK = 340.0


@pytest.fixture(autouse=True)
def _no_probe(monkeypatch):
    monkeypatch.setattr(ME, "_framework", FRAMEWORK)  # no framework probe process


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_declares_a_memory_profile(name):
    cls = REGISTRY[name]
    shape = ME.model_shape(load_config("tiny-llama"))
    run = ME.Sizes(trainable=cls.trainable_kinds[0], batch_size=2, max_seq_length=16)
    assert isinstance(cls.memory_profile(cls.Config(), run, shape), ME.Profile)


@pytest.mark.parametrize("name", ["inference", *sorted(REGISTRY)])
def test_memory_cli_prints_an_estimate_for_every_method(name, capsys):
    assert main(["memory", "--model", "tiny-llama", "--method", name, "--batch-size", "2",
                 "--max-seq-length", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tiny-llama (float32), {name}")
    assert re.search(r"^estimated peak RSS +\d+$", out, re.M), out


def _total(*flags: str) -> float:
    """prge's estimated total on the default model's shape (meta device: no weights), with
    P-RGE's two-point estimate (2 replicas a query; the default fzoo has q + 1)."""
    est = ME.estimate(load_config("random:smollm2-135m"), get_method("prge"), "lora", 8, 64,
                      framework=FRAMEWORK, estimator="spsa",
                      **dict(zip(flags[::2], flags[1::2])))
    return est.total


def test_prge_grows_with_queries_and_shrinks_with_smaller_forwards(capsys):
    q1, q2, q4 = _total("queries", 1), _total("queries", 2), _total("queries", 4)
    assert q1 < q2 < q4
    # the widest forward sets the activations: 4 queries capped at 2 replicas = 1 query's
    assert _total("queries", 4, "max_replicas", 2) == q1
    assert _total("queries", 4, "parallel", "inner") == q1
    assert _total("queries", 4, "parallel", "none") < q1 < _total("queries", 4, "parallel",
                                                                  "outer")
    # and the CLI passes the flags through
    argv = ["memory", "--model", "random:smollm2-135m", "--method", "prge", "--batch-size", "8",
            "--max-seq-length", "64"]
    assert main(argv + ["--queries", "4", "--estimator", "spsa"]) == 0
    out = capsys.readouterr().out
    assert "activations of 64 rows" in out and f"{q4:10.0f}" in out


def test_a_method_without_a_profile_is_a_clear_error(monkeypatch, capsys):
    class NoProfile(Method):
        name = "no-profile"

        def step(self, batches, step, lr, eps=None):
            raise NotImplementedError

    monkeypatch.setitem(REGISTRY, "no-profile", NoProfile)
    assert main(["memory", "--model", "tiny-llama", "--method", "no-profile"]) == 2
    assert "--method no-profile has no memory profile" in capsys.readouterr().err


def test_method_settings_are_checked_against_the_method():
    with pytest.raises(SystemExit, match="--zo-passes is a setting of --method zo-sgd"):
        main(["memory", "--model", "tiny-llama", "--method", "adam", "--zo-passes", "pair"])
    with pytest.raises(SystemExit, match="--method inference has no settings: --queries"):
        main(["memory", "--model", "tiny-llama", "--method", "inference", "--queries", "2"])


@pytest.mark.parametrize("name,trainable", [(n, k) for n, c in sorted(REGISTRY.items())
                                            for k in c.trainable_kinds])
def test_memory_cli_estimates_every_trainable_set_a_method_takes(name, trainable, capsys):
    assert main(["memory", "--model", "tiny-llama", "--method", name, "--trainable", trainable,
                 "--batch-size", "2", "--max-seq-length", "16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^estimated peak RSS +\d+$", out, re.M), out
    if trainable in ME.ROUGH_SETS and get_method(name).trains_model:
        assert f"--trainable {trainable}: a rough estimate" in out


@pytest.mark.parametrize("trainable", sorted(ME.ROUGH_SETS))
def test_a_small_set_estimates_below_full_parameters(trainable):
    """Backprop through a small set keeps no full-size gradients or moments."""
    config = load_config("random:smollm2-135m")
    small = ME.estimate(config, get_method("lora-adam"), trainable, 8, 64, framework=FRAMEWORK)
    full = ME.estimate(config, get_method("adam"), "full", 8, 64, framework=FRAMEWORK)
    assert small.total < full.total
    assert small.components["optimizer state (AdamW: 2 moments)"] < 1
