"""The federation's log: per round its seeds, aggregated scalars and learning rate.

    line 1     header: format, seed, pool, queries, run (the digest of the settings every
               device must share: model, trainable set, method and its settings)
    line r+2   round r: {"round", "seeds", "grads", "lr", "hash", "clients", "excluded"}

`hash` is the sha256 the included devices reported of their trainable tensors at the start of
round r (after rounds 0..r-1): the server holds no weights, only this log, and checks every
round that the devices it counts agree on it. The base model plus the log rebuild the shared
model on any device (`Device.catch_up`), as a run's `zo_log.jsonl` does for one run.

The file is rewritten whole and atomically (a temporary file, fsynced, then renamed) after
each round: a server killed at any moment restarts from the last complete round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "pocketllm-fed-log/1"
NAME = "fed_log.jsonl"
HEADER = ("seed", "pool", "queries", "run")
RECORD = ("round", "seeds", "grads", "lr", "hash")


class FedLog:
    """The log in `out_dir`: `records` in memory, the file rewritten on each `append`."""

    def __init__(self, out_dir: str | Path, header: dict):
        self.path = Path(out_dir) / NAME
        self.header = {"format": FORMAT, **{k: header[k] for k in HEADER}}
        self.records: list[dict] = []
        if self.path.exists():
            self._resume()

    def _resume(self) -> None:
        """Continue the log on disk, which must be this federation's."""
        lines = self.path.read_text().splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
            recs = [json.loads(x) for x in lines[1:]]
        except json.JSONDecodeError as e:
            raise SystemExit(f"{self.path}: not a federation log ({e})") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise SystemExit(f"{self.path}:1: not a {FORMAT} header")
        for k in HEADER:
            if head.get(k) != self.header[k]:
                raise SystemExit(f"{self.path} belongs to another federation ({k}: "
                                 f"{head.get(k)!r} there, {self.header[k]!r} now); use another "
                                 "--out or delete it")
        for i, rec in enumerate(recs):
            if not isinstance(rec, dict) or rec.get("round") != i or any(k not in rec
                                                                         for k in RECORD):
                raise SystemExit(f"{self.path}:{i + 2}: round record {i} malformed")
        self.records = recs

    def append(self, rec: dict) -> None:
        self.records.append(rec)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            for r in [self.header, *self.records]:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def read(out_dir: str | Path) -> tuple[dict, list[dict]]:
    """A finished (or interrupted) federation's header and round records."""
    path = Path(out_dir) / NAME
    if not path.is_file():
        raise SystemExit(f"{path}: no federation log")
    lines = path.read_text().splitlines()
    head = json.loads(lines[0])
    log = FedLog.__new__(FedLog)
    log.path, log.header, log.records = path, head, []
    log._resume()
    return head, log.records
