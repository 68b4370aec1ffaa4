"""The benchmark workload's masked-LM path: the loss it scores, and every method running it."""

import pytest
import torch

from pocketllm.workload import Scored, fixed_batch, make_step, masked_lm_stats, train_args
from pocketllm.methods import build
from pocketllm.models import load_model
from pocketllm.trainable import setup_trainable


def test_masked_lm_loss_is_the_cross_entropy_of_the_mlm_head_at_the_mask():
    model, tok = load_model("tiny-roberta")
    b = fixed_batch(len(tok), 3, 12, masked=True)
    assert ((b["labels"] != -100).sum(1) == 1).all()
    with torch.no_grad():
        st = masked_lm_stats(model, b)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    sel = b["labels"] != -100
    want = torch.nn.functional.cross_entropy(logits[sel].float(), b["labels"][sel],
                                             reduction="none")
    assert torch.allclose(st.nll, want, atol=1e-5)


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_zo_on_a_masked_lm_pair_and_sequential_passes_agree(trainable):
    model, tok = load_model("tiny-roberta")
    b = fixed_batch(len(tok), 4, 12, masked=True)
    gs = []
    for passes in ("pair", "sequential"):
        model, _ = load_model("tiny-roberta")
        args = train_args("zo-sgd", trainable, "float32", "tiny-roberta")
        _, params = setup_trainable(model, args)
        m = build("zo-sgd", model, params, args, Scored(masked_lm_stats), zo_passes=passes)
        gs.append(m.step([b], 0, 0.0).extra["projected_grad"])
    assert gs[0] == pytest.approx(gs[1], rel=1e-3, abs=1e-4)
    assert gs[0] != 0.0  # the perturbation reaches the loss (the head included)


@pytest.mark.parametrize("method,trainable", [("inference", "full"), ("zo-sgd", "full"),
                                              ("zo-sgd", "lora"), ("lora-adam", "lora"),
                                              ("adam", "full")])
def test_every_method_runs_on_a_masked_lm(method, trainable):
    model, tok = load_model("tiny-roberta")
    b = fixed_batch(len(tok), 2, 8, masked=True)
    step = make_step(method, model, b, train_args(method, trainable, "float32", "tiny-roberta"))
    step(0)
    step(1)
