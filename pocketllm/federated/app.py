"""The Flower app: a `ServerApp` that runs the round protocol (server.py) over Flower's
Message API and a `ClientApp` that answers it as a device (device.py).

Each round the server sends every sampled node one "train" message (the log's rounds that node
lacks; it draws the round's seeds itself) and collects the replies (losses or projected
gradients, a hash of its weights);
after the last round one "query" message brings every node up to date and checks that all
hold the same weights. Only `wire.py`'s ConfigRecord crosses the wire. A node keeps its
trainable tensors and the rounds it has applied in its `Context.state` (never sent), so a
simulated device is a state, not a process: one model per process serves them all.

Settings come from `settings_of(context)`: a closure in `pocketllm federate simulate`; for
`flwr run` / `federate serve`, the YAML file named by the run config's (server) or the node
config's (device) `pocketllm-config` (module attributes `server_app` and `client_app`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..schedules import lr_at
from . import build, wire

CONFIG_KEY = "pocketllm-config"
STATE_W, STATE_META = "fed.weights", "fed.meta"  # a node's Context.state entries
Settings = Callable[[Context], tuple[object, dict]]


# ---- the device ---------------------------------------------------------------------------
_SHARED: dict[str, build.Shared] = {}  # per process: the model and data, loaded once
_BATCHES: dict[tuple[str, int, int], object] = {}


def _shared(args, settings) -> tuple[str, build.Shared]:
    key = json.dumps([repr(args), sorted(settings.items())], default=str)
    if key not in _SHARED:
        import torch
        torch.set_num_threads(max(1, args.threads))
        _SHARED[key] = build.load(args, settings)
    return key, _SHARED[key]


def _load_state(dev, state) -> None:
    """A node's weights and rounds applied, from its Context.state (none: the base model)."""
    if STATE_META not in state:
        dev.reset()
        return
    import torch
    saved = state[STATE_W].to_torch_state_dict()
    with torch.no_grad():
        for name, t in dev.params:
            t.copy_(saved[name])
    dev.have = int(state[STATE_META]["have"])


def _save_state(dev, state) -> None:
    state[STATE_W] = ArrayRecord({n: p.detach().clone() for n, p in dev.params})
    state[STATE_META] = ConfigRecord({"have": dev.have})


def device_reply(msg: Message, context: Context, settings_of: Settings) -> Message:
    """One node's answer to a train (probe) or query (sync) message."""
    args, settings = settings_of(context)
    key, sh = _shared(args, settings)
    dev = sh.device
    part = int(context.node_config.get("partition-id", args.partition_id))
    parts = int(context.node_config.get("num-partitions", args.clients))
    _load_state(dev, context.state)
    if (key, part, parts) not in _BATCHES:
        try:
            _BATCHES[(key, part, parts)] = build.batches_for(sh, part, parts)
        except ValueError as e:  # a partition without examples: no probe from this node
            print(f"device {part}: {e}", flush=True)
            _BATCHES[(key, part, parts)] = None
    dev.batch_at = _BATCHES[(key, part, parts)]
    try:
        req = wire.unpack_request(msg.content, dev.method.queries)
    except (KeyError, TypeError, ValueError) as e:
        reply = {"error": f"malformed request: {e}", "have": dev.have}
    else:
        reply = dev.handle(req)
    _save_state(dev, context.state)
    return Message(wire.pack_reply(reply), reply_to=msg)


def make_client_app(settings_of: Settings) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return device_reply(msg, context, settings_of)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return device_reply(msg, context, settings_of)

    return app


# ---- the server ---------------------------------------------------------------------------
def _replies(grid: Grid, msgs: list[Message], timeout: float,
             tap: Callable | None) -> dict[int, dict]:
    for m in msgs:
        if tap:
            tap("out", m)
    got = {}
    for m in grid.send_and_receive(msgs, timeout=timeout):
        if tap:
            tap("in", m)
        src = m.metadata.src_node_id
        got[src] = ({"error": f"{m.error.reason}"} if m.has_error()
                    else wire.unpack_reply(m.content))
    return got


def _nodes(grid: Grid, want: int, timeout: float) -> list[int]:
    """The connected nodes, once `want` are (or `timeout` seconds have passed)."""
    t0 = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() - t0 > timeout:
            return nodes
        time.sleep(0.5)


def run_server(grid: Grid, args, settings: dict, tap: Callable | None = None,
               say: Callable[[str], None] = print) -> dict:
    """Rounds until --iters (resuming the log in --adapter-path), then the closing sync.
    `tap(direction, message)` sees every message sent and received. Returns the summary."""
    cls, cfg = build.resolve(args, settings)
    coord = build.coordinator(args, cfg)
    if coord.round:
        say(f"resuming the federation log at round {coord.round}")
    want = min(args.clients_per_round or args.clients, args.clients)
    t0, times, server = time.perf_counter(), [], []
    for rnd in range(coord.round, args.iters):
        t = time.perf_counter()
        nodes = _nodes(grid, want, args.round_timeout)
        if args.clients_per_round and len(nodes) > args.clients_per_round:
            nodes = sorted(random.Random(args.seed * 1_000_003 + rnd).sample(
                nodes, args.clients_per_round))
        t_own = time.perf_counter()
        msgs = [Message(wire.pack_request(coord.request(n)), dst_node_id=n,
                        message_type="train", group_id=str(rnd)) for n in nodes]
        own = time.perf_counter() - t_own
        replies = _replies(grid, msgs, args.round_timeout, tap)
        t_own = time.perf_counter()
        rec = coord.close(rnd, replies, lr_at(args, rnd))
        own += time.perf_counter() - t_own
        times.append(time.perf_counter() - t)
        server.append(own)  # the protocol's own work, not waiting for the devices
        loss = f" | loss {rec['loss']:.4f}" if "loss" in rec else ""
        out = f" | excluded {rec['excluded']}" if rec["excluded"] else ""
        say(f"round {rnd} | {len(rec['clients'])}/{len(nodes)} devices{loss}{out}")
    nodes = sorted(grid.get_node_ids())
    msgs = [Message(wire.pack_request(coord.request(n, probe=False)), dst_node_id=n,
                    message_type="query", group_id="sync") for n in nodes]
    final = coord.check_final(_replies(grid, msgs, args.round_timeout, tap))
    summary = {"rounds": coord.round, "hash": final["hash"], "agree": len(final["agree"]),
               "differ": final["differ"], "seconds": time.perf_counter() - t0,
               "round_seconds": times, "server_seconds": server}
    Path(args.adapter_path, "fed_summary.json").write_text(json.dumps(summary, indent=2))
    say(f"{coord.round} rounds | {len(final['agree'])} devices hold the same weights "
        f"({(final['hash'] or '?')[:12]})" + (f" | differ: {final['differ']}"
                                                if final["differ"] else ""))
    return summary


def make_server_app(settings_of: Settings, tap: Callable | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        args, settings = settings_of(context)
        run_server(grid, args, settings, tap)

    return app


# ---- deployment: settings from a YAML file the run / node config names -------------------
def settings_from_file(path: str) -> tuple[object, dict]:
    """`FederateArgs` and the method's settings from a YAML file (`federate serve` writes it)."""
    from ..config import FederateArgs, load_yaml, resolve_with
    from ..methods import setting_classes, settings_for
    import argparse
    values = load_yaml(path, FederateArgs, *setting_classes())
    args, rest = resolve_with(FederateArgs, argparse.Namespace(**values), *setting_classes())
    return args, settings_for(args.method, rest)


def _from_run_config(context: Context):
    return settings_from_file(str(context.run_config[CONFIG_KEY]))


def _from_node_config(context: Context):
    return settings_from_file(str(context.node_config[CONFIG_KEY]))


server_app = make_server_app(_from_run_config)
client_app = make_client_app(_from_node_config)
