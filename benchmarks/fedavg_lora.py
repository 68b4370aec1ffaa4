"""FedAvg of LoRA deltas, in process: the accuracy baseline beside federated zeroth-order
training (benchmarks/federated_sst2.py's `fedavg` arm; Flower's FlowerTune LLM example is
LoRA + FedAvg).

Each round every device starts from the global adapter, trains it first order on its own
partition (pocketllm's lora-adam: `Method.steps`, a fresh AdamW each round, --local-steps steps
of its own batches), and the server averages the devices' adapters weighted by their examples
(McMahan et al.'s FedAvg). The partition and each device's batch order are the federated
run's (`federated.build.batches_for`: the same --partition, --clients, --seed); one model in
this process plays every device in turn. No Flower here: the wire is not what is measured
(benchmarks/federated.py sizes an adapter as an ArrayRecord), only accuracy against rounds.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch


def run(args, rounds: int, local_steps: int, eval_every: int, say=print,
        on_point=None) -> list[tuple[int, float, float]]:
    """(round, dev accuracy, training seconds so far) every `eval_every` rounds. `args`: a
    FederateArgs with --method lora-adam (its --learning-rate, --batch-size, --clients,
    --partition, --eval-examples ...). `on_point(curve)`: called after each evaluation."""
    from pocketllm.data.source import load_run_data
    from pocketllm.evaluate import evaluate
    from pocketllm.federated import build
    from pocketllm.loss import is_masked_lm
    from pocketllm.methods import get_method
    from pocketllm.models import load_model
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    cls = get_method(args.method)
    cfg = cls.resolve(args, {})
    data = load_run_data(args)
    model, tok = load_model(args.model, args.dtype)
    objective = data.objective(tok)
    enc = data.encode(tok, is_masked_lm(model), args.max_seq_length, args.mask_prompt)
    spec, params = cls.trainable(model, args)
    method = cls(model, params, cfg, args, objective)
    # the federated run's partition and batch order (build.batches_for reads the objective
    # from shared.device.method)
    shared = build.Shared(args, data, tok, SimpleNamespace(method=method), spec, enc)
    devices = []
    for part in range(args.clients):
        try:
            devices.append(build.batches_for(shared, part, args.clients))
        except ValueError as e:  # a partition without examples: not a device
            say(f"device {part}: {e}")
    sizes = [len(b.batcher) for b in devices]
    tensors = [p for _, p in params]
    lr = args.learning_rate  # (resolve filled in the method's default)

    def score(r, secs):
        with torch.no_grad():
            res = evaluate(model, enc["test"].items, 16, tok.pad_token_id, -1,
                           objective=objective)
        say(f"fedavg round {r}: dev accuracy {res.accuracy:.1%} ({secs:.0f} s training)")
        curve.append((r, res.accuracy, secs))
        if on_point:
            on_point(curve)

    curve, secs = [], 0.0
    score(0, 0.0)
    for r in range(rounds):
        t0 = time.perf_counter()
        start = [t.detach().clone() for t in tensors]
        total = [torch.zeros_like(t) for t in tensors]
        for batches, n in zip(devices, sizes):
            with torch.no_grad():
                for t, s in zip(tensors, start):
                    t.copy_(s)
            method.opt.state.clear()  # a fresh AdamW: a device keeps no state between rounds
            # its own batches r*K .. r*K+K-1: it walks through its partition over the rounds
            for _ in method.steps(lambda k, b=batches, r=r: b(r * local_steps + k), 0,
                                  local_steps, lambda k: (lr, None)):
                pass
            for acc, t in zip(total, tensors):
                acc.add_(t.detach(), alpha=n)
        with torch.no_grad():
            for t, acc in zip(tensors, total):
                t.copy_(acc / sum(sizes))
        secs += time.perf_counter() - t0
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            score(r + 1, secs)
    return curve
