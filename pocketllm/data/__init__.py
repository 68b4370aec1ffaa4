"""Training data: the mlx-lm ``.jsonl`` formats, tokenization, and batching."""

from .batching import (IGNORE_INDEX, Batcher, StepBatches, collate, epoch_permutation,
                       eval_batches)
from .formats import (
    KINDS,
    ROLES,
    SPLITS,
    DataError,
    EncodedSplit,
    encode,
    encode_all,
    load_jsonl,
    load_splits,
    n_loss_tokens,
    record_kind,
)

__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "ROLES",
    "SPLITS",
    "Batcher",
    "StepBatches",
    "DataError",
    "EncodedSplit",
    "collate",
    "encode",
    "encode_all",
    "epoch_permutation",
    "eval_batches",
    "load_jsonl",
    "load_splits",
    "n_loss_tokens",
    "record_kind",
]
