import pytest
import torch
import torch.nn.functional as F

from pocketllm.loss import group_losses, token_stats
from pocketllm.models import load_model
from tests.helpers import TEXTS, tiny_batch


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma"])
def test_chunked_loss_equals_full_logits(name, monkeypatch):
    import pocketllm.loss as L
    monkeypatch.setattr(L, "VOCAB_CHUNK", 100)  # several chunks over the tiny vocabulary (260)
    model, tok = load_model(name)
    b = tiny_batch(tok, TEXTS)
    with torch.no_grad():
        s = token_stats(model, b)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    lg, tg = logits[:, :-1].float(), b["labels"][:, 1:]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100,
                          reduction="none").view(tg.shape)
    mask = tg != -100
    assert torch.allclose(s.nll, (nll * mask).sum(1), atol=1e-4, rtol=1e-5)
    assert torch.equal(s.tokens, mask.sum(1).float())
    argmax_ok = ((lg.argmax(-1) == tg) & mask).sum(1).float()
    assert torch.equal(s.correct, argmax_ok)
    ref = (nll * mask).sum() / mask.sum()
    assert group_losses(s, 1).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_place_chunk_buffers_match_the_autograd_path(dtype, monkeypatch):
    # without autograd the chunk loop reuses two buffers and exponentiates in place; with it,
    # fresh tensors. Same figures, per group, with a short last chunk (260 = 2 x 100 + 60).
    import pocketllm.loss as L
    monkeypatch.setattr(L, "VOCAB_CHUNK", 100)
    model, tok = load_model("tiny-gemma", dtype=dtype)
    b = tiny_batch(tok, TEXTS[:2] * 2)
    with torch.no_grad():
        fast = token_stats(model, b, groups=2)
    with torch.enable_grad():
        ref = token_stats(model, b, groups=2)
    for a, r in ((fast.nll, ref.nll), (fast.tokens, ref.tokens), (fast.correct, ref.correct)):
        assert torch.equal(a, r.detach())


def test_prompt_masked_positions_are_not_scored():
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, ["Category of 'ran 5k':", "Category of 'paid rent':"], [" health", " money"])
    s = token_stats(model, b)
    n_completion = [len(tok(" health").input_ids), len(tok(" money").input_ids)]
    # each completion's tokens plus the end-of-sequence token are scored, nothing else
    assert s.tokens.tolist() == [n + 1 for n in n_completion]


def test_gradients_flow_through_chunks():
    model, tok = load_model("tiny-llama")
    b = tiny_batch(tok, TEXTS[:2])
    w = model.get_output_embeddings().weight
    w.requires_grad_(True)
    token_stats(model, b).nll.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def tiny_roberta():
    """The tiny masked LM (2-layer RoBERTa, byte tokenizer with <mask>)."""
    return load_model("tiny-roberta")


def _task_batch(model, tok, name, masked):
    from pocketllm.data import collate
    from pocketllm.data.tasks import TASKS, Example, encode_examples
    task = TASKS[name]
    exs = [Example({"sentence": s}, i % 2) for i, s in enumerate(TEXTS)]
    return collate(encode_examples(exs, task, tok, masked, 64), tok.pad_token_id)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-gemma",
                                  "tiny-roberta"])
def test_label_word_logits_equal_full_vocabulary_logits(name):
    """The classification forward reads only the label rows at the answer position; the
    figures must be those of the model's own full logits at those indices."""
    from pocketllm.loss import class_stats, is_masked_lm
    model, tok = tiny_roberta() if name == "tiny-roberta" else load_model(name)
    masked = is_masked_lm(model)
    assert masked == (name == "tiny-roberta")
    b = _task_batch(model, tok, "sst2", masked)
    with torch.no_grad():
        s = class_stats(model, b)
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    rows = torch.arange(len(b["class_label"]))
    ref = full[rows, b["answer_pos"]].float().gather(1, b["label_ids"])  # (B, C)
    if getattr(model.config, "final_logit_softcapping", None):
        pass  # gemma's own logits are already soft-capped, as ours are
    nll = F.cross_entropy(ref, b["class_label"], reduction="none")
    assert torch.allclose(s.nll, nll, atol=1e-5)
    assert torch.equal(s.pred, ref.argmax(1))
    assert torch.equal(s.correct, (ref.argmax(1) == b["class_label"]).float())


def test_choice_loss_is_cross_entropy_of_mean_candidate_loglik():
    from pocketllm.data import collate
    from pocketllm.data.tasks import TASKS, Example, encode_examples
    model, tok = load_model("tiny-llama")
    f = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
         "choice2": "Water flowed.", "question": "effect"}
    b = collate(encode_examples([Example(f, 1), Example(f, 0)], TASKS["copa"], tok, False),
                tok.pad_token_id)
    with torch.no_grad():
        s = token_stats(model, b)
        lm = token_stats(model, {k: b[k] for k in ("input_ids", "attention_mask", "labels")})
    score = (-lm.nll / lm.tokens).view(2, 2)
    assert torch.allclose(s.nll, F.cross_entropy(score, torch.tensor([1, 0]), reduction="none"))
    assert s.nll.shape == (2,) and torch.equal(s.pred, score.argmax(1))
