"""zo.shared: layers below the first trainable one run once for all replicas of a pass, and the
replicas' losses are those of the repeated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.engines.torch_engine import TorchEngine
from pocketllm.loss import decoder_layers
from pocketllm.models import load_model
from pocketllm.objectives import choose
from pocketllm.trainable import setup_trainable
from pocketllm.zo import noise
from pocketllm.zo.plan import Plan, Replica, group_passes
from pocketllm.zo.shared import first_trained_layer
from tests.objectives._samples import SAMPLES

EPS = 5e-2
REPLICAS = [Replica(0, 1.0), Replica(0, -1.0), Replica(1, 1.0), Replica(-1, 0.0),
            Replica(1, -1.0)]


def _setup(model_name, objective_name, **kw):
    model, tok = load_model(model_name)
    args = TrainArgs(model=model_name, seed=3, lora_rank=4, **kw)
    _, params = setup_trainable(model, args)
    with torch.no_grad():  # B = 0 at init would hide a wrong perturbation
        for n, p in params:
            if ".lora_B" in n:
                p.add_(0.05)
            p.requires_grad_(False)
    items, _ = SAMPLES[objective_name](tok)
    objective = choose(items)
    return model, params, objective, objective.collate(items, tok.pad_token_id)


def _losses(engine, batch, params, parallel="both"):
    keys = [[noise.derive_key(5, q, i) for i in range(len(params))] for q in range(2)]
    return engine.losses(batch, Plan(keys, EPS, REPLICAS, group_passes(REPLICAS, parallel, 0)))


@pytest.mark.parametrize("objective_name", sorted(SAMPLES))
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma"])
def test_shared_layers_give_the_losses_of_the_repeated_batch(model_name, objective_name):
    model, params, objective, batch = _setup(model_name, objective_name, lora_layers="1")
    engine = TorchEngine(model, params, objective.stats, dist="rademacher")
    assert engine.first == 1  # LoRA on the last of two layers: layer 0 is shared

    rows = []  # the rows layer 0 and layer 1 put out
    layers = decoder_layers(model)
    hooks = [layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: rows.append((i, (out[0] if isinstance(out, tuple) else out)
                                              .shape[0]))) for i in (0, 1)]
    shared = _losses(engine, batch, params)
    for h in hooks:
        h.remove()
    B, G = batch["input_ids"].shape[0], len(REPLICAS)
    assert rows == [(0, B), (1, G * B)]  # the frozen layer saw the batch once

    engine.first = None  # the same engine, every layer on every replica
    whole = _losses(engine, batch, params)
    assert len(set(whole.tolist())) > 2  # the perturbations move the loss
    assert shared.tolist() == pytest.approx(whole.tolist(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("objective_name", sorted(SAMPLES))
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma"])
def test_a_final_norm_alone_shares_every_layer(model_name, objective_name):
    """--norm-layers 0: every decoder layer runs once on the batch; the replicas begin at the
    final norm, and their losses are the repeated batch's."""
    model, params, objective, batch = _setup(model_name, objective_name, trainable="norm",
                                             norm_layers="0")
    with torch.no_grad():  # a scale of ones would hide a perturbation applied to the wrong rows
        for _, p in params:
            p.add_(torch.linspace(-0.2, 0.2, p.numel()).view_as(p))
    layers = decoder_layers(model)
    engine = TorchEngine(model, params, objective.stats, dist="rademacher")
    assert engine.first == len(layers)
    rows = []
    h = layers[-1].register_forward_hook(
        lambda _m, _a, out: rows.append((out[0] if isinstance(out, tuple) else out).shape[0]))
    shared = _losses(engine, batch, params)
    h.remove()
    assert rows == [batch["input_ids"].shape[0]]  # the top layer too saw the batch once

    engine.first = None
    whole = _losses(engine, batch, params)
    assert len(set(whole.tolist())) > 2
    assert shared.tolist() == pytest.approx(whole.tolist(), rel=1e-6, abs=1e-7)


def test_one_replica_a_pass_shares_nothing():
    model, params, objective, batch = _setup("tiny-llama", "lm", lora_layers="1")
    engine = TorchEngine(model, params, objective.stats)
    seen = []
    h = decoder_layers(model)[0].register_forward_pre_hook(
        lambda _m, a, kw: seen.append(1), with_kwargs=True)
    _losses(engine, batch, params, parallel="none")  # each replica its own forward
    h.remove()
    assert len(seen) == len(REPLICAS)


@pytest.mark.parametrize("kw,first", [
    ({"lora_layers": "1"}, 1),
    ({}, None),                        # LoRA on layer 0 too: nothing below it
    ({"trainable": "norm"}, None),     # layer 0's norms too: nothing below them
    ({"trainable": "norm", "norm_layers": "1"}, 1),  # layer 1's norms and the final norm
    ({"trainable": "norm", "norm_layers": "0"}, 2),  # the final norm alone: both layers shared
    ({"trainable": "prefix"}, None),   # virtual tokens enter before every layer
    ({"trainable": "full"}, None),     # the embedding is trained
])
def test_first_trained_layer(kw, first):
    model, params, *_ = _setup("tiny-llama", "lm", **kw)
    assert first_trained_layer(model, [n for n, _ in params]) == first


def test_a_prge_run_on_the_top_layer_trains_and_replays(tmp_path, monkeypatch):
    """`train --lora-layers 1` end to end through the shared layers; its ZO log replays to the
    weights it saved, bit for bit (replay applies the logged scalars, running no forward)."""
    from pocketllm.cli import main
    from pocketllm.zo import shared
    from safetensors.torch import load_file

    calls = []
    real = shared.shared_prefix
    monkeypatch.setattr("pocketllm.engines.torch_engine.shared_prefix",
                        lambda *a: calls.append(a[1:]) or real(*a))
    out = tmp_path / "run"
    data = Path(__file__).resolve().parents[2] / "examples" / "personal"
    assert main(["train", "--model", "tiny-llama", "--data", str(data),
                 "--method", "prge", "--queries", "2", "--batch-size", "2", "--iters", "3",
                 "--lora-layers", "1", "--max-seq-length", "128", "--steps-per-eval", "0",
                 "--val-batches", "1", "--adapter-path", str(out)]) == 0
    assert calls == [(1, 3)] * 3  # one pass a step: layer 1 on, 2 queries + the unperturbed
    assert main(["replay", "--adapter-path", str(out), "--save-path", str(tmp_path / "re")]) == 0
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "re" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(".layers.0." not in k for k in a)  # the adapter is on the top layer only
