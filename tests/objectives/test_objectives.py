"""Every registered objective keeps the contracts the training code relies on: per-row batches
(a batch repeated G times and scored with groups=G gives each group the batch's own loss, which
is how zeroth-order methods score perturbations in one forward), `n_scored` equal to what the
loss averages over, and split-mode rows and targets that agree. Plus how one is chosen."""

from __future__ import annotations

import pytest
import torch

from pocketllm.evaluate import evaluate
from pocketllm.loss import backbone, group_losses
from pocketllm.models import load_model
from pocketllm.objectives import (REGISTRY, Classification, LanguageModeling, choose,
                                  for_batch)

from ._samples import SAMPLES, choice_items, classification_items, lm_items

G = 3
MODELS = ["tiny-llama", "tiny-gemma"]  # gemma: soft-capped logits
CASES = [(o, m) for o in sorted(REGISTRY) for m in MODELS]


def repeat(batch: dict, g: int) -> dict:
    return {k: v.repeat(g, *[1] * (v.dim() - 1)) for k, v in batch.items()}


@pytest.fixture(scope="module")
def models():
    return {m: load_model(m) for m in MODELS}


def setup(models, name, model_name):
    model, tok = models[model_name]
    items, task = SAMPLES[name](tok)
    objective = choose(items)
    return model, tok, items, task, objective, objective.collate(items, tok.pad_token_id)


def test_every_objective_has_a_conformance_sample():
    assert set(SAMPLES) == set(REGISTRY)


@pytest.mark.parametrize("name,model_name", CASES)
def test_chosen_from_its_items_and_from_its_task(models, name, model_name):
    model, tok, items, task, objective, batch = setup(models, name, model_name)
    assert type(objective) is REGISTRY[name]
    assert type(choose(task=task)) is REGISTRY[name]
    assert type(choose(items, task=task)) is REGISTRY[name]
    assert type(for_batch(batch)) is REGISTRY[name]


@pytest.mark.parametrize("name,model_name", CASES)
def test_collate_is_per_row(models, name, model_name):
    model, tok, items, task, objective, batch = setup(models, name, model_name)
    again = objective.collate(list(items) * G, tok.pad_token_id)
    assert again.keys() == batch.keys()
    for k, v in repeat(batch, G).items():
        assert torch.equal(again[k], v), k


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name,model_name", CASES)
def test_each_group_of_a_repeated_batch_gets_the_batch_loss(models, name, model_name, grad):
    model, tok, items, task, objective, batch = setup(models, name, model_name)
    with torch.set_grad_enabled(grad):
        one = objective.stats(model, batch)
        many = objective.stats(model, repeat(batch, G), groups=G)
    ref = group_losses(one, 1).detach()
    assert torch.allclose(group_losses(many, G).detach(), ref.expand(G), rtol=1e-5, atol=1e-6)
    assert torch.allclose(many.nll.detach(), one.nll.detach().repeat(G), rtol=1e-5, atol=1e-5)
    assert torch.equal(many.tokens, one.tokens.repeat(G))


@pytest.mark.parametrize("name,model_name", CASES)
def test_n_scored_is_what_the_loss_averages_over(models, name, model_name):
    model, tok, items, task, objective, batch = setup(models, name, model_name)
    with torch.no_grad():
        s = objective.stats(model, batch)
    assert objective.n_scored(batch) == int(s.tokens.sum()) > 0
    assert objective.n_scored(repeat(batch, G)) == G * objective.n_scored(batch)
    # the batch loss is the sum of the entries over n_scored
    assert group_losses(s, 1).item() == pytest.approx(float(s.nll.sum()) / objective.n_scored(batch))


@pytest.mark.parametrize("name,model_name", CASES)
def test_split_rows_and_targets_agree(models, name, model_name):
    model, tok, items, task, objective, batch = setup(models, name, model_name)
    with torch.no_grad():
        hidden = backbone(model, batch)
    rows = objective.scored_rows(hidden, batch)
    targets, candidates = objective.batch_targets(batch)
    assert rows.shape == (targets.shape[0], hidden.shape[-1])
    assert candidates is None or candidates.shape[0] == rows.shape[0]
    big = repeat(batch, G)
    assert torch.equal(objective.scored_rows(hidden.repeat(G, 1, 1), big), rows.repeat(G, 1))
    assert torch.equal(objective.batch_targets(big)[0], targets.repeat(G))


@pytest.mark.parametrize("name,model_name", CASES)
def test_evaluation_figures(models, name, model_name):
    model, tok, items, task, objective, batch = setup(models, name, model_name)
    with torch.no_grad():
        s = objective.stats(model, batch)
    gold = objective.gold(batch)
    if gold is not None:
        assert gold.shape == s.pred.shape
        assert 0 <= int(gold.max()) < objective.n_classes(batch)
    r = evaluate(model, items, 2, tok.pad_token_id, objective=objective)
    assert (r.accuracy is not None) == objective.accuracy
    assert (r.macro_f1 is not None) == (gold is not None)
    assert (r.exact_match is not None) == objective.exact_match(items)
    assert r.records == len(s.tokens)
    assert r.loss == pytest.approx(group_losses(s, 1).item(), rel=1e-5)
    # by default evaluate chooses the same objective from the items
    assert evaluate(model, items, 2, tok.pad_token_id) == r


def test_choose_without_items_or_task_is_language_modelling():
    assert type(choose()) is LanguageModeling
    choices = torch.tensor([3, 4])
    assert choose(choices=choices).choices is choices


def test_unknown_items_and_misplaced_choices_are_clear_errors():
    _, tok = load_model("tiny-llama")
    with pytest.raises(ValueError, match="0 objectives take it"):
        choose([([1, 2], 1, {"something": 1})])
    items, task = classification_items(tok)
    with pytest.raises(ValueError, match="language modelling"):
        choose(items, choices=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="sst2"):
        choose(lm_items(tok)[0], task=task)
    assert type(choose(choice_items(tok)[0])) is not Classification
