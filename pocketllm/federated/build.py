"""From run settings (`FederateArgs` and the method's own) to the server's header and to a
device: its model, trainable set, ZO method and its share of the training data."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check
from ..data import Batcher, StepBatches
from ..data.source import RunData, load_run_data
from ..loss import is_masked_lm
from ..methods import get_method
from ..methods.zo import ZOMethod
from ..models import load_model
from . import partition
from .device import Device, run_digest


def resolve(args, settings: dict):
    """The ZO method class and its resolved Config (defaults filled in), refused early if the
    method is not zeroth-order."""
    cls = get_method(args.method)
    if not issubclass(cls, ZOMethod):
        raise SystemExit(f"federate: --method {args.method} is not zeroth-order; a federation "
                         "exchanges seeds and scalars (use zo-sgd or prge)")
    cfg = cls.resolve(args, settings)
    check(cfg)
    cls.prepare(args, cfg)
    return cls, cfg


def header(args, cfg) -> dict:
    """The federation log's header: what server and devices must agree on."""
    queries = getattr(cfg, "queries", 1)
    return {"seed": args.seed, "pool": args.seed_pool, "queries": queries,
            "run": run_digest(args, cfg, args.seed_pool, queries)}


def estimator(args, cfg):
    """(the run's estimator, round -> its eps): what the server needs to apply it to the
    devices' pooled losses (`--aggregate pooled`), without a model."""
    from ..schedules import eps_at
    from ..zo import estimators
    return (estimators.build(cfg, getattr(cfg, "queries", 1)),
            lambda rnd: eps_at(cfg, rnd, args.iters))


def coordinator(args, cfg):
    """The server's state for these settings: its log in --adapter-path (resumed if there)."""
    from .log import FedLog
    from .server import Coordinator
    return Coordinator(FedLog(args.adapter_path, header(args, cfg)), args.aggregate, args.trim,
                       args.grad_bound, estimator(args, cfg))


def label_of(rec):
    """A training example's label for a non-IID split (a task's class, a record's completion;
    None: unlabelled)."""
    if hasattr(rec, "label"):
        return rec.label
    return rec.get("completion") if isinstance(rec, dict) else None


@dataclass
class Shared:
    """What every device of one process shares: the data read once, the model, the method."""

    args: object
    data: RunData
    tok: object
    device: Device
    spec: object
    enc: dict


def load(args, settings: dict) -> Shared:
    """The model and ZO method for these settings, as a device without data of its own yet
    (`batches_for` gives it a partition's)."""
    cls, cfg = resolve(args, settings)
    data = load_run_data(args)
    model, tok = load_model(args.model, args.dtype)
    objective = data.objective(tok)  # from the whole training set: the same on every device
    enc = data.encode(tok, is_masked_lm(model), args.max_seq_length, args.mask_prompt)
    spec, params = cls.trainable(model, args)
    method = cls(model, params, cfg, args, objective)
    h = header(args, cfg)
    return Shared(args, data, tok, Device(method, None, h["run"], args.iters, h["pool"]),
                  spec, enc)


def batches_for(shared: Shared, part: int, parts: int) -> StepBatches:
    """Device `part` of `parts`: its examples under --partition, batched with its own seed."""
    args = shared.args
    recs, enc = shared.data.splits["train"], shared.enc["train"]
    index = enc.index or range(len(enc.items))  # the record of each item (a task's: 1:1)
    labels = [label_of(recs[i]) for i in index]
    idx = partition.split(labels, parts, args.partition, args.seed)[part]
    items = [enc.items[i] for i in idx]
    objective = shared.device.method.objective
    return StepBatches(Batcher(items, args.batch_size, args.seed * 100_003 + part + 1,
                               shared.tok.pad_token_id, args.grad_accumulation,
                               objective.collate))
