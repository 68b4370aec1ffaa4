"""The split server's memory under its limits: 200 sessions open, then hostile maximum-size steps.

    python benchmarks/split_server_memory.py [--sessions 200] [--model smollm2-135m]

A real `pocketllm serve` (its default limits, one torch thread) on loopback, its RSS read from
/proc (VmRSS now, VmHWM the peak):

1. base: the server with the model's output head loaded (one minimal session trained a step);
2. `--sessions` sessions of the default device's side network (every layer tapped, width 64,
   depth 1, labels sent), spread over as many tokens as --max-sessions-per-token needs, each
   opened and trained one step of random activations: at most --max-resident-sessions stay in
   memory, the least recently used idle ones are evicted to their checkpoints; then a second
   step on each, every one reloaded from its checkpoint;
3. hostile steps, each the largest the server admits (its `step_memory` estimate just under
   --max-step-mb): labels sent with 1024 candidate label words per row, and private labels,
   beside the sessions and each alone in a fresh server; one row more is refused.

The bound checked: peak RSS <= base + resident sessions x `side_memory` + the `step_memory`
of the step in flight; and the worst case the limits allow (every resident session at
--max-side-params with the most modules, --max-streams steps at --max-step-mb at once). All sessions
are deleted at the end (the Delete RPC), which also removes their checkpoints.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from _run import ROOT, start_server, write_table

sys.path.insert(0, str(ROOT))
import grpc  # noqa: E402
import torch  # noqa: E402

from pocketllm.bench.machine import describe  # noqa: E402
from pocketllm.config import ServeArgs  # noqa: E402
from pocketllm.split import split_pb2 as pb  # noqa: E402
from pocketllm.split.client import SplitClient, qtensor  # noqa: E402
from pocketllm.split.side import (SideConfig, side_memory, side_params, step_memory,  # noqa: E402
                                  tap_layers)
from pocketllm.split.wire import config_to_spec  # noqa: E402

MB = 2**20


def status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, MB."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def random_step(cfg: SideConfig, step: int, rows: int, vocab: int, n_candidates: int = 0
                ) -> list[pb.Batch]:
    """A step of random activations as the device sends it: one message per tap, final state,
    targets and candidates (labels sent) with the last."""
    g = torch.Generator().manual_seed(step)
    parts = []
    for i, _ in enumerate(cfg.taps):
        b = pb.Batch(step=step, part=i, parts=len(cfg.taps))
        qtensor(torch.randn(rows, cfg.hidden, generator=g), cfg.act_bits, b.taps.add())
        parts.append(b)
    if not cfg.private_labels:
        last = parts[-1]
        qtensor(torch.randn(rows, cfg.hidden, generator=g), cfg.act_bits, last.final)
        bound = n_candidates or vocab
        last.targets = torch.randint(0, bound, (rows,), generator=g,
                                     dtype=torch.int32).numpy().tobytes()
        if n_candidates:
            last.candidates = torch.randint(0, vocab, (rows, n_candidates), generator=g,
                                            dtype=torch.int32).numpy().tobytes()
            last.n_candidates = n_candidates
    return parts


def train_step(client: SplitClient, sid: str, parts: list[pb.Batch]) -> list[pb.Reply]:
    """Send one step; with private labels answer the side output with a zero gradient."""
    ups = [pb.Upload(session_id=sid, batch=b) for b in parts]
    replies: list[pb.Reply] = []
    got = threading.Event()

    def uploads():
        yield from ups
        ups.clear()  # the parts are serialized: let them go
        if got.wait(600) and replies[0].WhichOneof("kind") == "output":
            d = replies[0].output.delta
            yield pb.Upload(session_id=sid, grad=pb.Grad(
                step=parts[0].step, grad=qtensor(torch.zeros(d.rows, d.cols), 32), loss=1.0))
    try:
        for r in client.stub.Train(uploads(), metadata=client.md, timeout=600):
            replies.append(r)
            got.set()
            if r.WhichOneof("kind") == "ack":
                break
    finally:
        got.set()
    return replies


def largest_rows(cfg: SideConfig, limit_mb: int, vocab: int, n_candidates: int) -> int:
    """The most rows whose step the server admits (binary search on `step_memory`)."""
    lo, hi = 1, 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if step_memory(cfg, mid, n_candidates, vocab) <= limit_mb * MB:
            lo = mid
        else:
            hi = mid - 1
    return lo


def hostile(client, pid, cfg, private, cands, vocab, lim, rows_out, notes, where) -> str:
    """The largest step the server admits on a new session (one row more is refused); a
    table row and a note on its peak against its `step_memory` estimate. Returns the id."""
    hcfg = SideConfig(**{**cfg.__dict__, "private_labels": private})
    sid = secrets.token_hex(16)
    client.stub.Open(pb.OpenRequest(session_id=sid, spec=config_to_spec(hcfg)),
                     metadata=client.md, timeout=600)
    r = largest_rows(hcfg, lim.max_step_mb, vocab, cands)
    est = step_memory(hcfg, r, cands, vocab)
    # one row more: refused (on its first part, before the rest is read, unless the
    # candidates, which come with the last part, are what tips it over)
    over = random_step(hcfg, 1, r + 1, vocab, cands)
    over = over if cands else over[:1]
    try:
        train_step(client, sid, over)
        refused = "NOT refused"
    except grpc.RpcError as e:
        refused = f"{r + 1} rows refused: {e.code().name}"
    del over
    parts = random_step(hcfg, 1, r, vocab, cands)
    wire = sum(b.ByteSize() for b in parts)
    before = status(pid)
    replies = train_step(client, sid, parts)
    del parts
    assert replies[-1].WhichOneof("kind") == "ack", replies
    now = status(pid)
    bound = before["VmRSS"] + est / MB
    what = f"labels sent, {cands} candidates/row" if cands else "private labels"
    rows_out.append([f"hostile step ({where}): {what}, {r} rows x {len(hcfg.taps)} taps "
                     f"({wire / MB:.0f} MB sent; estimate {est / MB:.0f} MB)",
                     f"{now['VmRSS']:.0f}", f"{now['VmHWM']:.0f}", f"{bound:.0f}",
                     "yes" if now["VmHWM"] <= bound else "NO"])
    notes.append(f"{what} ({where}): the peak grew {now['VmHWM'] - before['VmHWM']:.0f} MB "
                 f"over the {before['VmHWM']:.0f} MB before it (RSS then "
                 f"{before['VmRSS']:.0f} MB), against the step's estimate of {est / MB:.0f} "
                 f"MB; {refused}.")
    return sid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=64, help="rows of each session's one step")
    a = p.parse_args()
    from pocketllm.models import load_config
    mcfg = load_config(a.model)
    hidden, layers, vocab = mcfg.hidden_size, mcfg.num_hidden_layers, mcfg.vocab_size
    lim = ServeArgs()
    load0 = os.getloadavg()
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="split_mem_"))
    # as many tokens (device owners) as --max-sessions-per-token requires
    n_tokens = -(-(a.sessions + 3) // lim.max_sessions_per_token)
    proc, address, token_file = start_server(tmp, threads=1, models=[a.model], tokens=n_tokens)
    pid = proc.pid
    rows_out, notes = [], []
    try:
        owners = [SplitClient(address, t) for t in Path(token_file).read_text().split()]
        client = owners[0]
        started = status(pid)
        rows_out.append(["server started (torch, gRPC imported)", f"{started['VmRSS']:.0f}",
                         f"{started['VmHWM']:.0f}", "", ""])

        # 1. base: the head loaded (a minimal session, one step)
        tiny = SideConfig(model=a.model, hidden=hidden, taps=[layers - 1], width=1, depth=0,
                          private_labels=False)
        sid0 = secrets.token_hex(16)
        client.stub.Open(pb.OpenRequest(session_id=sid0, spec=config_to_spec(tiny)),
                         metadata=client.md, timeout=600)
        train_step(client, sid0, random_step(tiny, 1, a.rows, vocab))
        base = status(pid)
        rows_out.append([f"base: {a.model} output head loaded", f"{base['VmRSS']:.0f}",
                         f"{base['VmHWM']:.0f}", "", ""])

        # 2. sessions of the default device's side network, one step each
        cfg = SideConfig(model=a.model, hidden=hidden, taps=tap_layers(layers, 1), width=64,
                         depth=1, private_labels=False)
        n_par = side_params(cfg)
        sids = []
        t0 = time.time()
        for i in range(a.sessions):
            sid, c = secrets.token_hex(16), owners[(i + 3) % n_tokens]
            c.stub.Open(pb.OpenRequest(session_id=sid, spec=config_to_spec(cfg)),
                        metadata=c.md, timeout=600)
            train_step(c, sid, random_step(cfg, 1, a.rows, vocab))
            sids.append((c, sid))
        t_sessions = time.time() - t0
        after = status(pid)
        resident = min(a.sessions + 1, lim.max_resident_sessions)
        per_session = side_memory(cfg)
        bound_sessions = base["VmRSS"] + (resident * per_session
                                          + step_memory(cfg, a.rows, 0, vocab)) / MB
        measured_per = (after["VmRSS"] - base["VmRSS"]) * MB / resident
        log = (tmp / "server.log").read_text()
        evicted = len(re.findall(r": evicted from memory", log))
        rows_out.append([f"{a.sessions} sessions open ({n_par:,} parameters each, {resident} "
                         f"resident, {evicted} evictions)", f"{after['VmRSS']:.0f}",
                         f"{after['VmHWM']:.0f}", f"{bound_sessions:.0f}",
                         "yes" if after["VmHWM"] <= bound_sessions else "NO"])
        # a second step on each, in the same order: every one is reloaded from its checkpoint
        # and evicts the least recently used
        t0 = time.time()
        for c, sid in sids:
            train_step(c, sid, random_step(cfg, 2, a.rows, vocab))
        t_again = time.time() - t0
        again = status(pid)
        log = (tmp / "server.log").read_text()
        evicted2 = len(re.findall(r": evicted from memory", log)) - evicted
        loaded = len(re.findall(r": loaded into memory", log))
        rows_out.append([f"a second step on each ({loaded} reloads from checkpoints, "
                         f"{evicted2} more evictions)", f"{again['VmRSS']:.0f}",
                         f"{again['VmHWM']:.0f}", f"{bound_sessions:.0f}",
                         "yes" if again["VmHWM"] <= bound_sessions else "NO"])
        notes.append(f"{a.sessions} sessions opened and trained one step each in "
                     f"{t_sessions:.0f}s; RSS beyond the base / resident sessions: "
                     f"{measured_per / MB:.1f} MB (the last step's heap included; the bound counts "
                     f"{per_session / MB:.1f} MB: 12 B x {n_par:,} parameters + 8 KB x "
                     f"{(per_session - 12 * n_par) // 8192} modules); the second steps took "
                     f"{t_again:.0f}s.")

        # 3. hostile steps at the largest size admitted, beside the sessions
        for private, cands in ((False, 1024), (True, 0)):
            sids.append((client, hostile(client, pid, cfg, private, cands, vocab, lim,
                                         rows_out, notes, "beside the sessions")))
        for c, sid in [(client, sid0), *sids]:
            c.delete(sid)
        left = list((tmp / "state").glob("*.pt"))
        notes.append(f"all {len(sids) + 1} sessions ({n_tokens} tokens) deleted with the "
                     f"Delete RPC: {len(left)} checkpoints left in the state directory.")
        for c in owners:
            c.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    # 4. each hostile step alone, in a fresh server (the heap above reuses what the first freed)
    for private, cands in ((False, 1024), (True, 0)):
        tmp = Path(tempfile.mkdtemp(prefix="split_mem_"))
        proc, address, token_file = start_server(tmp, threads=1, models=[a.model])
        try:
            client = SplitClient(address, Path(token_file).read_text().strip())
            sid0 = secrets.token_hex(16)
            client.stub.Open(pb.OpenRequest(session_id=sid0, spec=config_to_spec(tiny)),
                             metadata=client.md, timeout=600)
            train_step(client, sid0, random_step(tiny, 1, a.rows, vocab))  # the head loaded
            hostile(client, proc.pid, cfg, private, cands, vocab, lim, rows_out, notes,
                    "fresh server")
            client.close()
        finally:
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(tmp, ignore_errors=True)
    # the most a session may hold: the parameter limit, and the most modules (every layer
    # tapped, depth 16) as objects
    deep = SideConfig(model=a.model, hidden=hidden, taps=tap_layers(layers, 1), width=1, depth=16)
    objects = side_memory(deep) - 12 * side_params(deep)
    worst_session = 12 * lim.max_side_params + objects
    worst = base["VmRSS"] + (lim.max_resident_sessions * worst_session
                             + lim.max_streams * lim.max_step_mb * MB) / MB
    notes.insert(0, f"Limits (the defaults): --max-side-params {lim.max_side_params:,}, "
                    f"--max-step-mb {lim.max_step_mb}, --max-sessions {lim.max_sessions}, "
                    f"--max-sessions-per-token {lim.max_sessions_per_token}, "
                    f"--max-resident-sessions {lim.max_resident_sessions}, --max-streams "
                    f"{lim.max_streams}. The bound: base + resident sessions x `side_memory` (12 B "
                    f"a parameter + 8 KB a module) + the `step_memory` of each step in flight "
                    f"(at most --max-streams, each at most --max-step-mb; an evicted session's "
                    f"reload, a fetch's copy fit in the same budget). Worst case the limits "
                    f"allow on {a.model}: base + {lim.max_resident_sessions} x "
                    f"{worst_session / MB:.0f} MB + {lim.max_streams} x {lim.max_step_mb} MB = "
                    f"{worst / 1024:.1f} GB.")
    notes.append(f"Load average at start (1/5/15 min): {load0[0]:.2f} / {load0[1]:.2f} / "
                 f"{load0[2]:.2f} on a machine shared with other jobs; finished in "
                 f"{time.time() - t_start:.0f}s.")
    write_table("split_server_memory.md", "Split server memory under its limits",
                "nice -n 10 python benchmarks/split_server_memory.py " + " ".join(sys.argv[1:]),
                describe(), ["stage", "RSS MB", "peak RSS MB", "bound MB", "within"],
                rows_out, "\n\n".join(notes))


if __name__ == "__main__":
    main()
