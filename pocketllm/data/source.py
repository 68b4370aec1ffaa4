"""What a run trains and evaluates on: `.jsonl` records, or a prompt-based task's examples.

Both are read and validated before the model loads (a bad file fails in a second, not after
minutes of loading), then encoded once the tokenizer is known. The rest of the code sees only
encoded items and the run's objective (`RunData.objective`), which batches and scores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .formats import EncodedSplit, encode_all, load_splits
from .tasks import Task, encode_examples, get_task, task_splits

if TYPE_CHECKING:
    from ..objectives import Objective


@dataclass
class RunData:
    splits: dict[str, list]            # split -> records (dicts) or task Examples
    where: str                          # the data directory, for messages
    task: Task | None = None
    warnings: list[str] = field(default_factory=list)

    def encode(self, tok, masked: bool, max_seq_length: int, mask_prompt: bool
               ) -> dict[str, EncodedSplit]:
        out = {}
        for name, recs in self.splits.items():
            if not recs:
                continue
            if self.task is None:
                out[name] = encode_all(recs, tok, mask_prompt=mask_prompt,
                                       max_seq_length=max_seq_length, name=f"{self.where}/{name}.jsonl")
                self.warnings += out[name].warnings(f"{self.where}/{name}.jsonl")
            else:
                items = encode_examples(recs, self.task, tok, masked, max_seq_length)
                out[name] = EncodedSplit(items=items, n_records=len(recs),
                                         max_seq_length=max_seq_length)
        return out

    def label_choices(self, tok) -> torch.Tensor | None:
        """For records: the closed label set, if the completions form one (see evaluate)."""
        if self.task is not None:
            return None
        from ..objectives import label_choices
        return label_choices(self.splits.get("train") or self.splits.get("test") or [], tok)

    def objective(self, tok) -> Objective:
        """What the run trains and evaluates (`pocketllm.objectives`), chosen from its task
        (none: language modelling on the records, with their closed label set if any)."""
        from ..objectives import choose
        return choose(task=self.task, choices=self.label_choices(tok))

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items() if v)
        return f"task {self.task.name} ({sizes})" if self.task else f"{self.where} ({sizes})"


def load_run_data(args, splits=("train", "valid"), required=("train",)) -> RunData:
    """Read (and validate) the data a run's settings name: `--task` examples drawn by the
    few-shot sampler, or `--data` .jsonl splits."""
    where = args.data_dir()
    if args.task:
        task = get_task(args.task, args.template, args.label_word_map())
        sp, warnings = task_splits(task, where, args.k, args.seed, args.eval_examples)
        return RunData({k: v for k, v in sp.items() if k in splits or k == "test"}, where,
                       task, warnings)
    return RunData(load_splits(where, splits=splits, required=required), where)
