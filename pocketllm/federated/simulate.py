"""`pocketllm federate simulate`: N devices on Flower's Simulation Engine (Ray), then the
shared model rebuilt from the federation's log, checked against the devices' hash, saved and
evaluated."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from . import build
from .log import read


def simulate(args, settings: dict, tap: Callable | None = None, rebuild: bool = True) -> dict:
    """Run the federation of --clients simulated devices; returns the summary (`rebuild`:
    then rebuild the shared model from the log, save and score it: `finish`)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from .app import make_client_app, make_server_app
    build.resolve(args, settings)  # bad settings fail here, before Ray starts
    Path(args.adapter_path).mkdir(parents=True, exist_ok=True)

    def settings_of(context):
        return args, settings
    t0 = time.perf_counter()
    run_simulation(make_server_app(settings_of, tap), make_client_app(settings_of),
                   num_supernodes=args.clients, backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.sim_cpus,
                                                 "include_dashboard": False}})
    summary = json.loads(Path(args.adapter_path, "fed_summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - t0
    if rebuild:
        summary.update(finish(args, settings, summary["hash"]))
    Path(args.adapter_path, "fed_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def finish(args, settings: dict, want: str | None) -> dict:
    """The shared model rebuilt here from the base and the log (as a device that joins last
    would), its hash checked against the devices', saved to --adapter-path and scored on
    valid."""
    from ..evaluate import evaluate
    head, records = read(args.adapter_path)
    sh = build.load(args, settings)
    dev = sh.device
    why = dev.catch_up(0, records)
    if why is not None:
        raise SystemExit(f"federate: the log does not replay: {why}")
    got = dev.hash()
    if want is not None and got != want:
        raise SystemExit(f"federate: the log rebuilds weights {got[:12]}, the devices hold "
                         f"{want[:12]}")
    if sh.spec is not None:
        sh.spec.save(dev.method.model, Path(args.adapter_path), base_model=args.model)
    out = {"rebuilt_hash_matches": want is not None and got == want}
    split = "test" if sh.data.task else "valid"
    if sh.enc.get(split):
        r = evaluate(dev.method.model, sh.enc[split].items, args.eval_batch_size,
                     sh.tok.pad_token_id, -1 if split == "test" else args.val_batches,
                     objective=dev.method.objective, stats=dev.method.scorer())
        out[split] = r.metrics()
        print(f"after {len(records)} rounds | {split}_{r.line().replace(' | ', f' | {split}_')}",
              flush=True)
    return out
