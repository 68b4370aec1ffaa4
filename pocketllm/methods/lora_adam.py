"""lora-adam: first-order LoRA with AdamW, the baseline zeroth-order methods are compared with.

Backprop through the frozen base keeps every layer's activations for the backward pass and adds
gradients and two Adam moments for the adapter: this is the memory the ZO methods avoid.
"""

from __future__ import annotations

from .base import register
from .first_order import FirstOrderAdamW


@register("lora-adam")
class LoRAAdam(FirstOrderAdamW):
    # the usual LoRA fine-tuning rate (PEFT / LoRA paper range 1e-4..5e-4), measured on SST-2
    # (benchmarks/results/sst2.md)
    # norm, prefix (not yet measured on a task): AdamW rates of LN tuning (1e-3) and of
    # prompt tuning (PEFT's examples: 3e-2; Lester et al. use 0.3 with Adafactor)
    # head (the answer rows' offsets, a linear probe): the demo's valid split, lr 1e-2
    # (benchmarks/results/demo.md)
    defaults = {"lora": {"learning_rate": 1e-4}, "norm": {"learning_rate": 1e-3},
                "prefix": {"learning_rate": 3e-2}, "head": {"learning_rate": 1e-2}}
    trainable_kinds = ("lora", "norm", "prefix", "head")
