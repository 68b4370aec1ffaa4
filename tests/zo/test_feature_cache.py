"""zo.feature_cache: with nothing in the backbone trained (`--trainable head`), each row's hidden
states are computed once, alone, and the replicas' losses equal those of the batch run whole."""

from __future__ import annotations

import pytest
import torch

from pocketllm.engines.torch_engine import TorchEngine
from pocketllm.head_rows import target_tokens
from pocketllm.loss import decoder_layers
from pocketllm.zo.feature_cache import backbone_is_frozen
from tests.zo.test_shared import _losses, _setup
from tests.objectives._samples import SAMPLES


@pytest.mark.parametrize("objective_name", sorted(SAMPLES))
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma"])
def test_cached_rows_give_the_losses_of_the_whole_batch(model_name, objective_name):
    from pocketllm.models import load_model
    _, tok = load_model(model_name)
    items, _ = SAMPLES[objective_name](tok)
    rows = ",".join(map(str, target_tokens(items)))
    model, params, objective, batch = _setup(model_name, objective_name, trainable="head",
                                             head_tokens=rows)
    with torch.no_grad():  # a zero offset would hide a perturbation of the wrong rows
        for _, p in params:
            p.add_(torch.linspace(-0.3, 0.3, p.numel()).view_as(p))
    assert backbone_is_frozen(model, params)
    engine = TorchEngine(model, params, objective.stats, dist="rademacher")
    cache = engine.features
    calls = []
    h = decoder_layers(model)[0].register_forward_hook(lambda m, a, out: calls.append(
        (out[0] if isinstance(out, tuple) else out).shape[0]))
    first = _losses(engine, batch, params)
    again = _losses(engine, batch, params)
    h.remove()
    B = batch["input_ids"].shape[0]
    distinct = len({tuple(r) for r in batch["input_ids"].tolist()})
    assert calls == [1] * distinct  # each distinct row once, alone, then never again
    assert cache.misses == distinct and cache.hits > 0
    assert torch.equal(first, again)

    engine.features = None  # the same engine, the backbone run on the batch
    whole = _losses(engine, batch, params)
    assert len(set(whole.tolist())) > 2  # the perturbations move the loss
    assert first.tolist() == pytest.approx(whole.tolist(), rel=1e-5, abs=1e-6)
    assert B >= 2


def test_a_trained_backbone_is_not_cached():
    model, params, *_ = _setup("tiny-llama", "lm", trainable="norm", norm_layers="0")
    assert not backbone_is_frozen(model, params)
    from pocketllm.engines.torch_engine import TorchEngine
    from pocketllm.objectives import LanguageModeling
    assert TorchEngine(model, params, LanguageModeling().stats).features is None


@pytest.mark.parametrize("objective_name", sorted(SAMPLES))
def test_the_valid_split_reads_its_rows_from_the_cache(objective_name):
    """Evaluation of a split scored again and again (valid) through the engine's scorer: the
    figures of the plain evaluation, each distinct row computed once over both evaluations;
    a split scored once is left to the plain evaluation."""
    from pocketllm.evaluate import evaluate
    from pocketllm.models import load_model
    model_name = "tiny-llama"
    _, tok = load_model(model_name)
    items, _ = SAMPLES[objective_name](tok)
    model, params, objective, batch = _setup(model_name, objective_name, trainable="head",
                                         head_tokens=",".join(map(str, target_tokens(items))))
    with torch.no_grad():
        for _, p in params:
            p.add_(torch.linspace(-0.3, 0.3, p.numel()).view_as(p))
    engine = TorchEngine(model, params, objective.stats, dist="rademacher")
    assert engine.scorer() is None and engine.scorer(repeated=False) is None
    calls = []
    hook = decoder_layers(model)[0].register_forward_hook(lambda m, a, out: calls.append(1))
    plain = evaluate(model, items, 2, tok.pad_token_id, objective=objective)
    n_plain = len(calls)
    calls.clear()
    score = engine.scorer(repeated=True)
    cached = [evaluate(model, items, 2, tok.pad_token_id, objective=objective, stats=score)
              for _ in range(2)]
    hook.remove()
    distinct = len({tuple(r) for r in batch["input_ids"].tolist()})
    assert len(calls) == distinct and n_plain < distinct  # once each, alone; then never
    for r in cached:
        assert r.loss == pytest.approx(plain.loss, rel=1e-5)
        assert (r.exact_match, r.token_accuracy, r.accuracy) == \
            (plain.exact_match, plain.token_accuracy, plain.accuracy)
