"""A run's reporting: metrics.jsonl (one JSON record per report), and a progress bar or plain lines.

Shared by the local training loop (train.py) and split mode's device loop (split/client.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = "metrics.jsonl"


class Reporter:
    """A progress bar on a terminal, one greppable line per report otherwise; JSONL always."""

    def __init__(self, out: Path, total: int, start: int, fresh: bool):
        self.path = out / METRICS
        self.last_wall = 0.0  # training seconds logged before a resume
        self.valid_steps: set[int] = set()  # steps whose valid evaluation is logged
        if fresh:
            self.path.write_text("")
        else:
            self._drop_after(start)
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def _drop_after(self, step: int) -> None:
        # a resumed run rewrites the steps after its restart point
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    if rec.get("step", 0) <= step:
                        keep.append(line)
                        self.last_wall = rec.get("wall", self.last_wall)
                        if "eval_loss" in rec:
                            self.valid_steps.add(rec["step"])
                except json.JSONDecodeError:
                    pass  # a line torn by the interruption
            self.path.write_text("".join(l + "\n" for l in keep))

    def record(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def say(self, text: str) -> None:
        if self.bar:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def progress(self, n: int, postfix: dict) -> None:
        if self.bar:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
