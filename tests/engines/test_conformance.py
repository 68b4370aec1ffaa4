"""Every registered engine computes what the explicitly perturbed model computes.

The reference for a replica (query j, sign s) is a deep copy of the model whose trainable
tensors get `noise.add_noise_(w, keys[j][i], 0, s * eps, dist)` in place, scored by the
objective's `stats` and `loss.group_losses`: the definition of w + s * eps * z(keys[j]). An
engine's `losses` must equal it (relative error <= 1e-5) for every replica, whichever way the
replicas are grouped into forward passes, for both perturbation distributions, on LoRA and on
full parameters, for every objective, before and after seeded updates; `apply` + `sync` must
equal adding the noise explicitly (bit for bit: the ZO log replays updates that way), and
`loss` must equal the plain loss. A new engine is checked by registering it.

An engine declares what it runs (`architectures`, `trainables`, `objectives`; None: any): it is
checked on every case it declares, and must refuse every other in its constructor (a ValueError
naming its flag). An engine other than torch runs another runtime's kernels: relative error
<= 1e-4. Its exported programs are cached in one directory for the module (exported once).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.engines import REGISTRY
from pocketllm.loss import group_losses
from pocketllm.models import load_model
from pocketllm.objectives import choose
from pocketllm.trainable import setup_trainable
from pocketllm.zo import noise
from pocketllm.zo.plan import PARALLEL, Plan, Replica, group_passes
from tests.objectives._samples import SAMPLES

REL = 1e-5        # torch
REL_ENGINE = 1e-4  # another runtime's kernels
EPS = 5e-2
# Several queries, both signs, and the unperturbed replica in the middle (so a pass mixes
# +/- pairs of one key, lone replicas and sign 0); query 2 has its - replica only.
REPLICAS = [Replica(0, 1.0), Replica(0, -1.0), Replica(1, 1.0), Replica(-1, 0.0),
            Replica(1, -1.0), Replica(2, -1.0)]
QUERIES = 3
# every --parallel mode, and capped passes (--max-replicas); "both" first: a program engine
# sizes its program by the widest pass yet, so each case exports one program
GROUPINGS = [(p, 0) for p in sorted(PARALLEL, key=lambda p: p != "both")] + [("both", 4),
                                                                              ("outer", 2)]
# seeded updates (keys of an unused query, coefficient), applied in this order
UPDATES = [(7, -3e-3), (8, 2e-3)]
# (model, trainable set): LoRA layers, full weights (the tied embedding/head included), a
# second architecture (GPT-2's Conv1D and learned positions through the generic forward)
CASES = [("tiny-llama", "lora"), ("tiny-llama", "full"), ("tiny-gpt2", "full")]


@pytest.fixture(scope="module")
def program_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("programs")


def _engine(engine_name, model_name, trainable, objective_name, program_cache):
    """The engine class and its constructor's options, or None after checking that it refuses
    a case it does not declare (skipped when its optional runtime is not installed)."""
    cls = REGISTRY[engine_name]
    for mod in getattr(cls, "modules", ()):
        pytest.importorskip(mod)
    options = {"program_cache": str(program_cache)} if "program_cache" in cls.settings else {}
    arch = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}[model_name]
    declared = all(getattr(cls, attr, None) is None or value in getattr(cls, attr)
                   for attr, value in (("architectures", arch), ("trainables", trainable),
                                       ("objectives", objective_name)))
    if not declared:
        model, params, objective, _ = _setup(model_name, trainable, objective_name)
        with pytest.raises(ValueError, match=f"--engine {engine_name}"):
            cls(model, params, objective.stats, **options)
        return None
    return cls, options


def _rel(engine_name: str) -> float:
    return REL if engine_name == "torch" else REL_ENGINE


def _keys(query: int, n: int) -> list[int]:
    return [noise.derive_key(5, query, i) for i in range(n)]


def _setup(model_name: str, trainable: str, objective_name: str):
    model, tok = load_model(model_name)
    args = TrainArgs(model=model_name, trainable=trainable, seed=3, lora_rank=4)
    _, params = setup_trainable(model, args)
    with torch.no_grad():  # B = 0 at init would hide a wrong A perturbation
        for n, p in params:
            if ".lora_B" in n:
                p.add_(0.05)
    for _, p in params:
        p.requires_grad_(False)
    items, _ = SAMPLES[objective_name](tok)
    objective = choose(items)
    return model, params, objective, objective.collate(items, tok.pad_token_id)


class Reference:
    """The explicitly perturbed model: a pristine copy taken before any engine touches it."""

    def __init__(self, model, params, objective, batch, dist):
        self.model, self.names = copy.deepcopy(model), [n for n, _ in params]
        self.objective, self.batch, self.dist = objective, batch, dist

    def _add(self, model, keys: list[int], coef: float) -> None:
        named = dict(model.named_parameters())
        for n, k in zip(self.names, keys):
            noise.add_noise_(named[n].data, k, 0, coef, self.dist)

    def update(self, updates) -> None:
        with torch.no_grad():
            for keys, coef in updates:
                self._add(self.model, keys, coef)

    def loss(self, keys: list[int] | None = None, scale: float = 0.0) -> float:
        m = self.model
        with torch.no_grad():
            if keys is not None:
                m = copy.deepcopy(self.model)
                self._add(m, keys, scale)
            return group_losses(self.objective.stats(m, self.batch), 1).item()

    def losses(self, keys: list[list[int]]) -> list[float]:
        return [self.loss() if r.query < 0 else self.loss(keys[r.query], r.sign * EPS)
                for r in REPLICAS]

    def params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.names}


def _check_losses(engine, ref, batch, keys, updates=(), rel=REL):
    """Every grouping's losses equal the reference's; with `updates`, queued before each plan
    (an engine may defer them into that plan's first forward, whatever its shape)."""
    for parallel, cap in GROUPINGS:
        if updates:
            engine.apply(updates)
            ref.update(updates)
        passes = group_passes(REPLICAS, parallel, cap)
        got = engine.losses(batch, Plan(keys, EPS, REPLICAS, passes))
        assert got.shape == (len(REPLICAS),) and got.dtype == torch.float64
        assert got.tolist() == pytest.approx(ref.losses(keys), rel=rel), (parallel, cap)


@pytest.mark.parametrize("dist", noise.DISTS)
@pytest.mark.parametrize("objective_name", sorted(SAMPLES))
@pytest.mark.parametrize("model_name,trainable", CASES)
@pytest.mark.parametrize("engine_name", sorted(REGISTRY))
def test_losses_apply_sync_and_loss_equal_the_explicit_reference(engine_name, model_name,
                                                                  trainable, objective_name,
                                                                  dist, program_cache):
    got = _engine(engine_name, model_name, trainable, objective_name, program_cache)
    if got is None:
        return  # refused, as it declares
    cls, options = got
    rel = _rel(engine_name)
    model, params, objective, batch = _setup(model_name, trainable, objective_name)
    ref = Reference(model, params, objective, batch, dist)
    engine = cls(model, params, objective.stats, dist=dist, **options)
    n = len(params)
    keys = [_keys(j, n) for j in range(QUERIES)]

    expect = ref.losses(keys)
    # the perturbations move the loss far more than the tolerance (a wrong key, sign or scale
    # would show; the tiny models' near-uniform outputs need an eps this large)
    assert max(expect) - min(expect) > 100 * rel * max(expect)
    _check_losses(engine, ref, batch, keys, rel=rel)
    assert engine.loss(batch) == pytest.approx(ref.loss(), rel=rel)

    # seeded updates, queued (an engine may defer them into the next perturbed forward)
    updates = [(_keys(q, n), c) for q, c in UPDATES]
    _check_losses(engine, ref, batch, keys, updates, rel=rel)
    engine.sync()
    for (name, p), want in zip(params, ref.params().values()):
        assert torch.equal(p, want), name

    # updates then `loss` (no perturbed forward in between), then `sync` again: applied once
    engine.apply(updates[:1])
    ref.update(updates[:1])
    assert engine.loss(batch) == pytest.approx(ref.loss(), rel=rel)
    engine.sync()
    for (name, p), want in zip(params, ref.params().values()):
        assert torch.equal(p, want), name


def test_the_registry_is_what_is_checked():
    """The test above is parametrized over the registry: the eager engine is in it."""
    assert "torch" in REGISTRY


# ---- the anchor (an anchored estimator, svrg): replicas at the weights of an earlier point ---
@pytest.mark.parametrize("model_name,trainable", CASES)
@pytest.mark.parametrize("engine_name", sorted(REGISTRY))
def test_replicas_at_the_anchor_see_the_kept_weights(engine_name, model_name, trainable,
                                                      program_cache):
    """`keep_anchor` copies the weights with the queued updates applied; later updates move
    the current weights only; a plan's anchor replicas (grouped apart by `group_passes`) equal
    the reference at the kept weights, its other replicas the reference at the current ones,
    and the current weights come back bit for bit."""
    got = _engine(engine_name, model_name, trainable, "classification", program_cache)
    if got is None:
        return
    cls, options = got
    rel = _rel(engine_name)
    model, params, objective, batch = _setup(model_name, trainable, "classification")
    dist = "gaussian"
    ref = Reference(model, params, objective, batch, dist)
    engine = cls(model, params, objective.stats, dist=dist, **options)
    n = len(params)
    keys = [_keys(j, n) for j in range(QUERIES)]
    updates = [(_keys(q, n), c) for q, c in UPDATES]
    engine.apply(updates[:1])          # queued before the anchor is kept: part of it
    ref.update(updates[:1])
    engine.keep_anchor()
    at_anchor = copy.deepcopy(ref)
    replicas = REPLICAS + [Replica(r.query, r.sign, anchor=True) for r in REPLICAS]
    for parallel, cap in GROUPINGS:
        engine.apply(updates[1:])      # queued after: the current weights' alone
        ref.update(updates[1:])
        passes = group_passes(replicas, parallel, cap)
        assert all(len({replicas[i].anchor for i in p}) == 1 for p in passes)
        got = engine.losses(batch, Plan(keys, EPS, replicas, passes)).tolist()
        k = len(REPLICAS)
        assert got[:k] == pytest.approx(ref.losses(keys), rel=rel), (parallel, cap)
        assert got[k:] == pytest.approx(at_anchor.losses(keys), rel=rel), (parallel, cap)
    assert max(at_anchor.losses(keys)) != pytest.approx(max(ref.losses(keys)), rel=100 * REL)
    engine.sync()
    for (name, p), want in zip(params, ref.params().values()):
        assert torch.equal(p, want), name
    for a, want in zip(engine.anchor, at_anchor.params().values()):
        assert torch.equal(a, want)


def test_no_anchor_no_anchor_replicas():
    model, params, objective, batch = _setup("tiny-llama", "lora", "classification")
    engine = REGISTRY["torch"](model, params, objective.stats)
    keys = [_keys(0, len(params))]
    plan = Plan(keys, EPS, [Replica(0, 1.0, anchor=True)], [[0]])
    with pytest.raises(RuntimeError, match="keep_anchor"):
        engine.losses(batch, plan)
    mixed = Plan(keys, EPS, [Replica(0, 1.0), Replica(0, 1.0, anchor=True)], [[0, 1]])
    engine.keep_anchor()
    with pytest.raises(ValueError, match="mixes replicas at the anchor"):
        engine.losses(batch, mixed)
