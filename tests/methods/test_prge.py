"""P-RGE: the batched multi-query estimate equals the sequential one, and it trains."""

import copy

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.loss import group_losses
from pocketllm.methods import build
from pocketllm.models import load_model
from pocketllm.trainable import setup_trainable
from pocketllm.zo import noise, optim
from pocketllm.zo.estimators.spsa import SPSA
from pocketllm.zo.log import replay_steps
from pocketllm.zo.plan import Plan, group_passes
from tests.helpers import TEXTS, tiny_batch, score

RUN = ("learning_rate", "lora_fa")  # the run's settings; the rest are the method's


def _setup(method="prge", **kw):
    if method == "prge":  # P-RGE's own settings: two-point, gaussian, as zo-sgd LoRA (the
        #                   default prge is fzoo with rademacher u at eps 1e-3)
        for k, v in (("estimator", "spsa"), ("perturbation", "gaussian"), ("eps", 1e-2)):
            kw.setdefault(k, v)
    model, tok = load_model("tiny-llama")
    args = TrainArgs(model="tiny-llama", method=method, trainable="lora", seed=3, lora_rank=4,
                     **{k: kw.pop(k) for k in RUN if k in kw})
    _, params = setup_trainable(model, args)
    with torch.no_grad():  # B = 0 at init would hide a wrong A perturbation
        for n, p in params:
            if ".lora_B" in n:
                p.add_(0.05)
    return model, tok, build(method, model, params, args, **kw), args


@pytest.mark.parametrize("lora_fa", [False, True])
@pytest.mark.parametrize("q", [1, 4])
def test_batched_estimate_equals_sequential(q, lora_fa):
    b = tiny_batch(load_model("tiny-llama")[1], TEXTS)
    grads = {}
    for parallel, R in (("none", 0), ("inner", 0), ("outer", 0), ("both", 0), ("both", 3)):
        _, _, m, _ = _setup(queries=q, parallel=parallel, max_replicas=R, lora_fa=lora_fa,
                            learning_rate=0.0)
        assert m.passes == group_passes(SPSA(q).replicas(), parallel, R)
        res = m.step([b], 0, 0.0)
        assert res.forward_passes == 2 * q
        grads[parallel, R] = m._last_grads
    ref = grads["none", 0]
    assert len(ref) == q and len(set(ref)) == q  # distinct queries
    for k, g in grads.items():
        assert g == pytest.approx(ref, rel=1e-3, abs=1e-3), k


@pytest.fixture(autouse=True)
def _record_grads(monkeypatch):
    """Keep each step's per-query projected grads on the method (the log is off in tests)."""
    from pocketllm.methods import zo
    orig = zo.ZOMethod._log

    def log(self, rec):
        self._last_grads = rec["projected_grads"]
        orig(self, rec)
    monkeypatch.setattr(zo.ZOMethod, "_log", log)


def test_each_replica_sees_its_own_explicitly_perturbed_adapter():
    model, tok, m, args = _setup(queries=3, parallel="both")
    b = tiny_batch(tok, TEXTS[:2])
    keys = m.keys(0)
    L = m.engine.losses(b, Plan(keys, 1e-2, m.replicas, m.passes))
    for j in range(3):
        for s, sign in enumerate((1.0, -1.0)):
            ref = copy.deepcopy(model)
            named = dict(ref.named_parameters())
            with torch.no_grad():
                for (n, _), k in zip(m.params, keys[j]):
                    noise.add_noise_(named[n].data, k, 0, sign * 1e-2, "gaussian")
                expect = group_losses(score(ref, b), 1).item()
            assert L[2 * j + s].item() == pytest.approx(expect, abs=2e-5), (j, s)


def test_q1_prge_is_zo_sgd():
    b = tiny_batch(load_model("tiny-llama")[1], TEXTS)
    g = [_setup(meth, learning_rate=0.0, **kw)[2].step([b], 0, 0.0).extra["projected_grad"]
         for meth, kw in (("prge", {"queries": 1}), ("zo-sgd", {}))]
    assert g[0] == g[1]


def test_lora_fa_trains_b_only_and_lowers_the_loss():
    model, tok, m, args = _setup(queries=4, lora_fa=True, learning_rate=2e-2)
    assert m.params and all(".lora_B" in n for n, _ in m.params)
    A = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A" in n}
    b = tiny_batch(tok, TEXTS)

    def loss():
        m.sync()
        with torch.no_grad():
            return group_losses(score(model, b), 1).item()

    before = loss()
    for s in range(30):
        m.step([b], s, 2e-2)
    assert loss() < before - 0.05
    for n, p in model.named_parameters():
        if n in A:
            assert torch.equal(p, A[n]), n


@pytest.mark.parametrize("zo_opt,lr", [("sgd", 2e-2), ("adam", 5e-3), ("momentum", 5e-3),
                                       ("sign-sgd", 2e-3), ("conservative", 2e-2)])
def test_prge_with_each_optimizer_lowers_the_loss_and_replays_exactly(zo_opt, lr):
    model, tok, m, args = _setup(queries=4, zo_optimizer=zo_opt, learning_rate=lr)
    init = {n: p.detach().clone() for n, p in m.params}
    b = tiny_batch(tok, TEXTS)
    recs = []
    orig_log = m._log
    m._log = lambda rec: (recs.append(rec), orig_log(rec))

    def loss():
        m.sync()
        with torch.no_grad():
            return group_losses(score(model, b), 1).item()

    before = loss()
    for s in range(20):
        m.step([b], s, lr)
    assert loss() < before - 0.02, zo_opt
    # replaying the log on the initial weights with a fresh optimizer ends on the same weights
    fresh = [(n, init[n].clone()) for n, _ in m.params]
    opt = optim.build(m.opt.spec(), [p for _, p in fresh])
    replay_steps(fresh, recs, args.seed, m.cfg.perturbation, opt)
    for (n, p), (_, r) in zip(m.params, fresh):
        assert torch.equal(p, r), n


def test_plan_passes_and_bad_input():
    reps = SPSA(2).replicas()  # (0, +), (0, -), (1, +), (1, -)
    assert [(r.query, r.sign) for r in reps] == [(0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0)]
    assert group_passes(reps, "both") == [[0, 1, 2, 3]]
    assert group_passes(reps, "inner") == [[0, 1], [2, 3]]
    assert group_passes(reps, "outer") == [[0, 2], [1, 3]]
    assert group_passes(reps, "both", max_replicas=3) == [[0, 1, 2], [3]]
    assert len(group_passes(SPSA(3).replicas(), "none")) == 6
    with pytest.raises(ValueError, match="--queries"):
        SPSA(0)
    with pytest.raises(ValueError, match="--parallel"):
        group_passes(reps, "sideways")


def test_prge_refuses_full_parameters(tmp_path):
    from pocketllm.cli import main
    with pytest.raises(SystemExit, match="lora"):
        main(["train", "--model", "tiny-llama", "--method", "prge", "--trainable", "full",
              "--adapter-path", str(tmp_path)])


def test_replay_rebuilds_a_prge_lora_fa_adam_run(tmp_path):
    from safetensors.torch import load_file

    from pocketllm.cli import main
    from tests.test_cli import FAST
    out, rebuilt = tmp_path / "run", tmp_path / "rebuilt"
    assert main(["train", *FAST, "--method", "prge", "--queries", "3", "--lora-fa",
                 "--zo-optimizer", "adam", "--learning-rate", "1e-3", "--iters", "4",
                 "--steps-per-eval", "0", "--adapter-path", str(out)]) == 0
    assert main(["replay", "--adapter-path", str(out), "--save-path", str(rebuilt)]) == 0
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(rebuilt / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
