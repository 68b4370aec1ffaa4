import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.loss import group_losses
from pocketllm.methods import REGISTRY, build, get_method
from pocketllm.models import load_model
from pocketllm.trainable import setup_trainable
from tests.helpers import TEXTS, tiny_batch, score

RUN = ("learning_rate", "lora_rank")  # the run's settings; the rest are the method's


def _setup(method, trainable="lora", **kw):
    model, tok = load_model("tiny-llama")
    args = TrainArgs(model="tiny-llama", method=method, trainable=trainable, seed=3,
                     **{k: kw.pop(k) for k in RUN if k in kw})
    _, params = setup_trainable(model, args)
    if method in ("lora-adam", "adam"):
        kw.pop("eps", None)  # a zeroth-order setting
    return model, tok, build(method, model, params, args, **kw), args


def test_registry_names_and_errors():
    assert {"zo-sgd", "lora-adam", "adam"} <= set(REGISTRY)
    with pytest.raises(ValueError, match="zo-sgd"):
        get_method("nope")


@pytest.mark.parametrize("method,trainable,lr,steps", [("zo-sgd", "lora", 2e-2, 60),
                                                       ("lora-adam", "lora", 1e-2, 20),
                                                       ("adam", "full", 1e-3, 10)])
def test_each_method_lowers_the_loss_of_a_fixed_batch(method, trainable, lr, steps):
    model, tok, m, args = _setup(method, trainable, learning_rate=lr, eps=1e-2, lora_rank=4)
    b = tiny_batch(tok, TEXTS)

    def loss():
        with torch.no_grad():
            m.sync()
            return group_losses(score(model, b), 1).item()

    before = loss()
    for s in range(steps):
        m.step([b], s, lr)
    assert loss() < before - 0.05


def test_zo_grad_accumulation_uses_one_perturbation_for_all_micro_batches():
    b1 = tiny_batch(load_model("tiny-llama")[1], TEXTS[:2])
    b2 = tiny_batch(load_model("tiny-llama")[1], TEXTS[2:])
    gs = []
    for batches in ([b1, b2], [b1], [b2]):
        _, _, m, _ = _setup("zo-sgd", learning_rate=0.0)
        gs.append(m.step(batches, 0, 0.0).extra["projected_grad"])
    assert gs[0] == pytest.approx((gs[1] + gs[2]) / 2, rel=1e-6)


def test_first_order_grad_accumulation_equals_one_big_batch():
    tok = load_model("tiny-llama")[1]
    results = []
    for batches in ([tiny_batch(tok, TEXTS[:2]), tiny_batch(tok, TEXTS[2:])], [tiny_batch(tok, TEXTS)]):
        model, _, m, _ = _setup("lora-adam", learning_rate=1e-2)
        with torch.no_grad():  # B = 0 at init would leave A without a gradient
            for _, p in m.params:
                p.add_(0.01)
        m.step(batches, 0, 0.0)
        results.append([p.grad.clone() for _, p in m.params])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("method,wrong,right", [("lora-adam", "full", "lora"),
                                               ("adam", "lora", "full")])
def test_first_order_methods_refuse_the_other_trainable_kind(tmp_path, method, wrong, right):
    from pocketllm.cli import main
    with pytest.raises(SystemExit, match=right):
        main(["train", "--model", "tiny-llama", "--method", method, "--trainable", wrong,
              "--adapter-path", str(tmp_path)])


def test_adam_trains_every_weight_and_its_checkpoint_restores_it(tmp_path):
    model, tok, m, args = _setup("adam", "full", learning_rate=1e-3)
    b = tiny_batch(tok, TEXTS)
    assert {n for n, _ in m.params} == {n for n, _ in model.named_parameters()}
    for s in range(2):
        m.step([b], s, 1e-3)
    m.save_state(tmp_path, 2)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    after2 = {n: p.detach().clone() for n, p in m.params}
    m.step([b], 2, 1e-3)
    want = {n: p.detach().clone() for n, p in m.params}
    # a fresh process would start from the base weights: restore must bring back step 2
    model2, _, m2, _ = _setup("adam", "full", learning_rate=1e-3)
    assert m2.restore(tmp_path) == 2
    for n, p in m2.params:
        assert torch.equal(p, after2[n]), n
    m2.step([b], 2, 1e-3)  # the AdamW moments came back too: the same third step
    for n, p in m2.params:
        assert torch.equal(p, want[n]), n


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_pair_and_sequential_passes_give_the_same_estimate(trainable):
    b = tiny_batch(load_model("tiny-llama")[1], TEXTS)
    gs = []
    for passes in ("pair", "sequential"):
        _, _, m, _ = _setup("zo-sgd", trainable=trainable, zo_passes=passes, learning_rate=0.0)
        gs.append(m.step([b], 0, 0.0).extra["projected_grad"])
    assert gs[0] == pytest.approx(gs[1], rel=1e-3, abs=1e-4)
