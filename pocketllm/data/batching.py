"""Batching: padding/labels, and a deterministic, resumable batch schedule.

:class:`Batcher` is a pure function of ``(seed, step, micro)``: the batch for a given
step never depends on which batches were asked for before, so an interrupted run
resumes exactly by asking for the next step, and a zeroth-order method can ask for
the same batch twice (once per perturbation) without any state to keep in sync.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["IGNORE_INDEX", "Batcher", "StepBatches", "collate", "epoch_permutation",
           "eval_batches"]

IGNORE_INDEX = -100  # label value ignored by the loss (Hugging Face convention)

Item = tuple[Sequence[int], int]  # (token ids, n_prompt); a task's items add a meta dict


def collate(items: Sequence[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, n_prompt)`` items to the longest one.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` int64.
    ``labels`` is ``input_ids`` with ``-100`` on padding and on the first ``n_prompt``
    positions of each row; it is *not* shifted (the model shifts labels itself).
    Padding is told apart by length, not by value, so ``pad_id`` may equal EOS.
    This is the language-modelling batch; the other objectives build theirs on it
    (``pocketllm.objectives``: ``choose(items).collate``).
    """
    if not items:
        raise ValueError("collate() needs at least one item")
    if len(items[0]) != 2:
        raise ValueError(f"collate() takes (ids, n_prompt) items, got {len(items[0])} fields: "
                         "a task's (ids, n_prompt, meta) items are batched by their objective, "
                         "pocketllm.objectives.choose(items).collate(items, pad_id)")
    lengths = [len(ids) for ids, _ in items]
    if min(lengths) == 0:
        raise ValueError("collate() got an item with no tokens")
    b, t = len(items), max(lengths)
    input_ids = torch.full((b, t), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(items):
        n = len(ids)
        row_ids = torch.as_tensor(list(ids), dtype=torch.long)
        input_ids[row, :n] = row_ids
        attention_mask[row, :n] = 1
        p = max(0, min(int(n_prompt), n))
        labels[row, p:n] = row_ids[p:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _epoch_seed(seed: int, epoch: int) -> int:
    # A stable (platform- and process-independent) 63-bit seed for each (seed, epoch).
    digest = hashlib.sha256(f"pocketllm-batcher:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the ``n`` items."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


class Batcher:
    """Training batches as a pure function of ``(seed, step, micro)``.

    The items form an endless stream of epochs; epoch ``e`` is a permutation of the
    dataset drawn from a ``torch.Generator`` seeded from ``(seed, e)``. Micro-batch
    ``micro`` of step ``step`` holds stream positions
    ``p0 .. p0 + batch_size - 1`` with ``p0 = (step * grad_accumulation + micro) * batch_size``.
    Batches run across epoch boundaries without a break, so every batch is full and
    every item is seen exactly once per epoch.

    A ``batch_size`` larger than the dataset is allowed: a batch then spans two or
    more epochs and holds some items more than once (each epoch still visits every
    item once).

    ``collate`` turns the items into a batch: the run's objective's (``pocketllm.objectives``);
    by default the language-modelling one below.
    """

    _CACHE_EPOCHS = 4

    def __init__(
        self,
        encoded: Sequence[Item],
        batch_size: int,
        seed: int,
        pad_id: int,
        grad_accumulation: int = 1,
        collate: Callable[[Sequence, int], dict[str, torch.Tensor]] = collate,
    ):
        if len(encoded) == 0:
            raise ValueError("Batcher needs at least one item")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be >= 1, got {grad_accumulation}")
        self.encoded = encoded
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.grad_accumulation = int(grad_accumulation)
        self._perms: OrderedDict[int, list[int]] = OrderedDict()
        self.collate = collate

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def items_per_step(self) -> int:
        return self.batch_size * self.grad_accumulation

    def epoch(self, step: int) -> float:
        """How many epochs are done at the start of ``step`` (fractional)."""
        return step * self.items_per_step / len(self.encoded)

    def _perm(self, epoch: int) -> list[int]:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = epoch_permutation(len(self.encoded), self.seed, epoch)
            self._perms[epoch] = perm
            while len(self._perms) > self._CACHE_EPOCHS:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def indices(self, step: int, micro: int = 0) -> list[int]:
        """Dataset indices of micro-batch ``micro`` of step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not 0 <= micro < self.grad_accumulation:
            raise ValueError(f"micro must be in [0, {self.grad_accumulation}), got {micro}")
        n = len(self.encoded)
        start = (step * self.grad_accumulation + micro) * self.batch_size
        return [self._perm(p // n)[p % n] for p in range(start, start + self.batch_size)]

    def __call__(self, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        return self.collate([self.encoded[i] for i in self.indices(step, micro)], self.pad_id)

    def whole(self) -> list[dict[str, torch.Tensor]]:
        """The training set once, in order, ``batch_size`` items a batch (the last may be
        smaller): what a full-batch estimate evaluates."""
        return list(eval_batches(self.encoded, self.batch_size, self.pad_id, self.collate))


class StepBatches:
    """What the loop hands a method (`Method.steps`): called with a step, that step's
    micro-batches; ``whole()``, the training set once (``Batcher.whole``)."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def __call__(self, step: int) -> list[dict[str, torch.Tensor]]:
        return [self.batcher(step, k) for k in range(self.batcher.grad_accumulation)]

    def whole(self) -> list[dict[str, torch.Tensor]]:
        return self.batcher.whole()


def eval_batches(encoded: Sequence[Item], batch_size: int, pad_id: int,
                 collate: Callable[[Sequence, int], dict[str, torch.Tensor]] = collate
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """All items in order, ``batch_size`` at a time (the last batch may be smaller), batched
    by ``collate`` (the objective's; by default language modelling's)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start : start + batch_size], pad_id)
