"""Prompt tuning (`--trainable prefix`): the virtual tokens shift every position by N and are
never scored; each zeroth-order replica sees its own perturbed prefix; generation with a cache
equals generation without; peft loads the saved adapter with the same logits."""

import pytest
import torch

from pocketllm.config import TrainArgs
from pocketllm.data.batching import IGNORE_INDEX
from pocketllm.loss import group_losses
from pocketllm.models import load_model
from pocketllm.prompt import add_virtual_tokens, virtual_tokens
from pocketllm.trainable import load_saved, setup_trainable
from pocketllm.zo import noise
from pocketllm.zo.perturb import Perturber
from tests.helpers import TEXTS, score, tiny_batch

CAUSAL = ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma"]
N = 5


def _prompted(name, n=N, seed=1):
    model, tok = load_model(name)
    vt = add_virtual_tokens(model, n, seed=seed)
    with torch.no_grad():  # away from the vocabulary rows it starts as
        vt.embeddings.add_(torch.randn(vt.embeddings.shape, generator=torch.Generator()
                                       .manual_seed(seed)) * 0.5)
    return model, tok, vt


def _with_prefix(plain, vt, batch):
    """`plain`'s logits over `batch` with the virtual tokens' embeddings in front, written by
    hand (inputs_embeds), at the real tokens' positions only."""
    with torch.no_grad():
        emb = plain.get_input_embeddings()(batch["input_ids"])
        x = torch.cat([vt.embeddings.to(emb.dtype).expand(emb.shape[0], -1, -1), emb], 1)
        mask = torch.cat([torch.ones(emb.shape[0], vt.n, dtype=batch["attention_mask"].dtype),
                          batch["attention_mask"]], 1)
        return plain(inputs_embeds=x, attention_mask=mask).logits[:, vt.n:]


@pytest.mark.parametrize("name", CAUSAL)
def test_virtual_tokens_are_never_scored(name):
    """The objective's loss equals a plain forward of the same model given the virtual tokens'
    embeddings in front, scored on the real tokens' positions only (shifted by N)."""
    model, tok, vt = _prompted(name)
    b = tiny_batch(tok, TEXTS, completions=[" a", " b c", " d", " e f g"])
    s = score(model, b)
    plain, _ = load_model(name)
    assert s.tokens.tolist() == score(plain, b).tokens.tolist()  # the same positions scored
    logits = _with_prefix(plain, vt, b)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    tgt = b["labels"][:, 1:]
    sel = tgt != IGNORE_INDEX
    nll = -(logp.gather(2, tgt.clamp(min=0)[..., None]).squeeze(2) * sel).sum(1)
    assert torch.allclose(s.nll, nll, atol=1e-4), (s.nll, nll)
    assert not torch.allclose(s.nll, score(plain, b).nll, atol=1e-3)  # the prefix does something


def test_a_task_answer_position_counts_real_tokens_only():
    """Classification reads the label words at `answer_pos`: a real token's position, the
    virtual tokens cut off before it."""
    from pocketllm.objectives import Classification
    from tests.objectives._samples import classification_items
    model, tok, vt = _prompted("tiny-llama")
    items, _ = classification_items(tok)
    obj = Classification()
    b = obj.collate(items, tok.pad_token_id)
    s = obj.stats(model, b)
    plain, _ = load_model("tiny-llama")
    logits = _with_prefix(plain, vt, b)
    rows = torch.arange(len(items))
    words = logits[rows, b["answer_pos"]][rows[:, None], b["label_ids"]]          # (B, C)
    nll = torch.nn.functional.cross_entropy(words.float(), b["class_label"], reduction="none")
    assert torch.allclose(s.nll, nll, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-gemma"])
def test_each_replica_sees_its_own_perturbed_prefix(name):
    """A batch repeated twice in one forward, group g with prefix w + s_g eps z: each group's
    loss equals a plain forward with that prefix written into the weights."""
    model, tok, vt = _prompted(name)
    b = tiny_batch(tok, TEXTS)
    params = [("virtual_tokens", vt.embeddings)]
    key, eps = noise.derive_key(3, 0, 0), 1e-1
    pair = {k: torch.cat([v, v]) for k, v in b.items()}
    pert = Perturber(model, params)
    with pert.active([key], eps, (1.0, -1.0), rows=pair["input_ids"].shape[0]) as hv:
        lp, lm = group_losses(score(model, pair, 2, hv), 2).tolist()
    w = vt.embeddings.detach().clone()
    explicit = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            noise.add_noise_(vt.embeddings.data, key, 0, sign * eps, "gaussian")
            explicit.append(group_losses(score(model, b), 1).item())
            vt.embeddings.copy_(w)
    assert [lp, lm] == pytest.approx(explicit, abs=2e-5)
    assert lp != pytest.approx(lm, abs=1e-7)


@pytest.mark.parametrize("name", CAUSAL)
def test_generation_with_a_cache_equals_generation_without(name):
    """The cached steps prepend nothing (the virtual tokens are in the cache) and their
    positions follow the prefix: greedy decoding matches a cache-free decode."""
    model, tok, _ = _prompted(name)
    enc = tok("Note: rent", return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**enc, use_cache=True, **kw)
        uncached = model.generate(**enc, use_cache=False, **kw)
        ids = enc["input_ids"]
        for _ in range(6):  # by hand: a whole forward per token
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
    assert cached.tolist() == uncached.tolist() == ids.tolist()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_peft_loads_our_prompt_adapter_with_same_logits(name, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = load_model(name)
    spec, _ = setup_trainable(model, TrainArgs(model=name, trainable="prefix",
                                               num_virtual_tokens=N))
    with torch.no_grad():
        virtual_tokens(model).embeddings.mul_(3.0)
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        ours = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    spec.save(model, tmp_path, base_model=name)
    base, _ = load_model(name)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path))
    with torch.no_grad():
        theirs = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(ours, theirs[:, N:], atol=1e-5)


def test_bad_virtual_token_counts_are_refused(tmp_path):
    model, _ = load_model("tiny-llama")
    with pytest.raises(SystemExit, match="--num-virtual-tokens must be at least 1"):
        add_virtual_tokens(model, 0)
    model, tok, vt = _prompted("tiny-llama", n=3)
    from pocketllm.prompt import PromptSpec
    PromptSpec(3).save(model, tmp_path, base_model="tiny-llama")
    other, _ = load_model("tiny-llama")
    add_virtual_tokens(other, 4)
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        load_saved(other, tmp_path)
