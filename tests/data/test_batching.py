"""Tests for pocketllm.data.batching: collate, the resumable Batcher, eval_batches."""

from __future__ import annotations

import pytest
import torch

from pocketllm.data import (IGNORE_INDEX, Batcher, StepBatches, collate, encode_all,
                            epoch_permutation, eval_batches)

from ._tok import tiny_tokenizer


def make_items(n: int):
    # item i: ids [1000+i, ...] of length 2 + i % 5, prompt length i % 3
    return [([1000 + i] + [i] * (1 + i % 5), i % 3) for i in range(n)]


def first_ids(batch) -> list[int]:
    return [v - 1000 for v in batch["input_ids"][:, 0].tolist()]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- collate


def test_collate_pads_right_and_masks_prompt_and_padding():
    batch = collate([([5, 6, 7, 8], 2), ([9, 10], 0), ([11, 12, 13], 1)], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for v in batch.values():
        assert v.dtype == torch.long and v.shape == (3, 4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, 7, 8],
        [9, 10, -100, -100],
        [-100, 12, 13, -100],
    ]
    assert IGNORE_INDEX == -100


def test_collate_pad_id_equal_to_eos_keeps_the_real_eos_in_the_labels():
    eos = 2
    batch = collate([([5, 6, eos], 1), ([7, eos], 1), ([8, 9, 10, eos], 2)], pad_id=eos)
    assert batch["labels"].tolist() == [[-100, 6, eos, -100], [-100, eos, -100, -100], [-100, -100, 10, eos]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 4]


def test_collate_edge_cases():
    batch = collate([([1, 2], 5)], pad_id=0)  # n_prompt beyond the end: nothing to learn, no crash
    assert batch["labels"].tolist() == [[-100, -100]]
    with pytest.raises(ValueError):
        collate([], pad_id=0)
    with pytest.raises(ValueError):
        collate([([], 0)], pad_id=0)
    with pytest.raises(ValueError, match="objective"):  # a task's items: its objective batches them
        collate([([1, 2], 2, {"class_label": 0, "answer_pos": 1, "label_ids": [3, 4]})], pad_id=0)


def test_collate_of_encoded_records():
    tok = tiny_tokenizer()
    split = encode_all(
        [{"prompt": "ab", "completion": "c"}, {"prompt": "defg", "completion": "hi"}],
        tok,
        mask_prompt=True,
        max_seq_length=None,
    )
    batch = collate(split.items, tok.pad_token_id)
    assert batch["labels"].tolist() == [
        [-100, -100, ord("c"), tok.eos_token_id, -100, -100, -100],
        [-100, -100, -100, -100, ord("h"), ord("i"), tok.eos_token_id],
    ]
    assert batch["input_ids"][0, 4:].tolist() == [tok.pad_token_id] * 3


# --------------------------------------------------------------------------- Batcher


def test_batcher_is_a_pure_function_of_seed_step_micro():
    items = make_items(37)
    b1 = Batcher(items, batch_size=4, seed=7, pad_id=0, grad_accumulation=2)
    b2 = Batcher(items, batch_size=4, seed=7, pad_id=0, grad_accumulation=2)
    keys = [(s, m) for s in range(25) for m in range(2)]
    first = {k: b1(*k) for k in keys}
    for k in reversed(keys):  # another instance, opposite order
        assert_same(b2(*k), first[k])
    for k in [(24, 1), (0, 0), (13, 1), (3, 0)]:  # the same instance again, jumping around
        assert_same(b1(*k), first[k])
    # a fresh instance asked only for a late step (a resumed run)
    assert_same(Batcher(items, 4, 7, 0, 2)(19, 1), first[(19, 1)])


def test_different_seeds_give_different_orders():
    items = make_items(50)
    a = [Batcher(items, 5, seed=0, pad_id=0).indices(s) for s in range(10)]
    b = [Batcher(items, 5, seed=1, pad_id=0).indices(s) for s in range(10)]
    assert a != b
    assert epoch_permutation(50, 0, 0) != epoch_permutation(50, 0, 1)  # epochs differ too


@pytest.mark.parametrize("n,bs,ga", [(10, 5, 1), (10, 4, 1), (13, 3, 2), (7, 1, 3)])
def test_each_epoch_visits_every_item_exactly_once(n, bs, ga):
    b = Batcher(make_items(n), batch_size=bs, seed=3, pad_id=0, grad_accumulation=ga)
    stream = []
    for step in range(4 * n):
        for micro in range(ga):
            stream += b.indices(step, micro)
    assert len(stream) >= 3 * n
    for e in range(3):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch) == list(range(n))
        assert epoch == epoch_permutation(n, 3, e)


def test_stream_positions_of_micro_batches():
    n, bs, ga = 11, 3, 2
    b = Batcher(make_items(n), bs, seed=5, pad_id=0, grad_accumulation=ga)
    stream = [i for e in range(5) for i in epoch_permutation(n, 5, e)]
    for s in range(6):
        for k in range(ga):
            start = (s * ga + k) * bs
            assert b.indices(s, k) == stream[start : start + bs]
            assert first_ids(b(s, k)) == stream[start : start + bs]
    assert b.items_per_step == 6
    assert b.epoch(11) == pytest.approx(6.0)


def test_batch_contents_match_the_items():
    items = make_items(9)
    b = Batcher(items, batch_size=4, seed=11, pad_id=0)
    batch = b(2)
    assert_same(batch, collate([items[i] for i in b.indices(2)], pad_id=0))


def test_batch_size_larger_than_the_dataset():
    n = 3
    b = Batcher(make_items(n), batch_size=8, seed=2, pad_id=0)
    idx = b.indices(0)
    assert len(idx) == 8 and b(0)["input_ids"].shape[0] == 8
    assert idx[:3] == epoch_permutation(n, 2, 0) and idx[3:6] == epoch_permutation(n, 2, 1)
    assert idx[6:] == epoch_permutation(n, 2, 2)[:2]


def test_cache_eviction_does_not_change_results():
    items = make_items(5)
    b = Batcher(items, 5, seed=9, pad_id=0)
    early = b.indices(1)
    for s in range(100, 120):  # touch many later epochs: epoch 1 falls out of the cache
        b.indices(s)
    assert b.indices(1) == early == Batcher(items, 5, 9, 0).indices(1)


def test_batcher_argument_checks():
    with pytest.raises(ValueError):
        Batcher([], 2, 0, 0)
    with pytest.raises(ValueError):
        Batcher(make_items(3), 0, 0, 0)
    with pytest.raises(ValueError):
        Batcher(make_items(3), 1, 0, 0, grad_accumulation=0)
    b = Batcher(make_items(3), 1, 0, 0, grad_accumulation=2)
    with pytest.raises(ValueError):
        b(0, 2)
    with pytest.raises(ValueError):
        b(-1)


# --------------------------------------------------------------------------- eval_batches


def test_eval_batches_cover_everything_in_order():
    items = make_items(10)
    batches = list(eval_batches(items, batch_size=4, pad_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert [i for b in batches for i in first_ids(b)] == list(range(10))
    assert_same(batches[1], collate(items[4:8], pad_id=0))
    assert list(eval_batches([], 4, 0)) == []
    assert len(list(eval_batches(items, 100, 0))) == 1
    with pytest.raises(ValueError):
        list(eval_batches(items, 0, 0))


def test_step_batches_give_a_step_s_micro_batches_and_the_whole_set():
    """What the loop hands a method: a step's micro-batches (the Batcher's), and the training
    set once in order (a full-batch estimate's), whatever the step."""
    items = make_items(10)
    b = Batcher(items, batch_size=4, seed=3, pad_id=0, grad_accumulation=2)
    at = StepBatches(b)
    for step in (0, 5):
        got = at(step)
        assert len(got) == 2
        for k in range(2):
            assert_same(got[k], b(step, k))
    whole = at.whole()
    assert [x["input_ids"].shape[0] for x in whole] == [4, 4, 2]
    assert [i for x in whole for i in first_ids(x)] == list(range(10))


def test_batcher_and_eval_batches_accept_an_encoded_split():
    records = [{"text": t} for t in ["ab", "cde", "f g", "hij"]]
    split = encode_all(records, tiny_tokenizer(), mask_prompt=True, max_seq_length=None)
    b = Batcher(split, batch_size=2, seed=0, pad_id=0)
    assert_same(b(1), collate([split.items[i] for i in b.indices(1)], 0))
    assert sum(x["input_ids"].shape[0] for x in eval_batches(split, 3, 0)) == 4


def test_batcher_and_eval_batches_batch_with_the_objective():
    # task items: batched by the collate of the objective the items call for
    from pocketllm.objectives import Classification, choose
    items = [([1000 + i, i, i], 3, {"class_label": i % 2, "answer_pos": 2, "label_ids": [7, 8]})
             for i in range(6)]
    assert type(choose(items)) is Classification
    with pytest.raises(ValueError, match="objective"):
        Batcher(items, 4, seed=1, pad_id=0)(0)  # the default, language modelling's, refuses
    for objective in (choose(items), Classification()):
        b = Batcher(items, 4, seed=1, pad_id=0, collate=objective.collate)
        assert_same(b(2), Classification().collate([items[i] for i in b.indices(2)], 0))
        batches = list(eval_batches(items, 4, 0, objective.collate))
        assert_same(batches[1], Classification().collate(items[4:], 0))
