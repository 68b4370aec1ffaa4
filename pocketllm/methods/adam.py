"""adam: first-order full fine-tuning with AdamW, the memory contrast the MeZO papers draw.

Every weight trains: on top of inference it keeps every layer's activations for backward, a
gradient per weight and two Adam moments per weight (about 4x the weights, plus activations).
Resumable from `checkpoint.pt` (weights and AdamW state, written atomically every --save-every).
"""

from __future__ import annotations

from .base import register
from .first_order import FirstOrderAdamW


@register("adam")
class Adam(FirstOrderAdamW):
    # MeZO's fine-tuning baselines use AdamW at 1e-5 (RoBERTa-large, OPT); measured on SST-2
    # (benchmarks/results/sst2.md)
    defaults = {"full": {"learning_rate": 1e-5}}
    trainable_kinds = ("full",)
