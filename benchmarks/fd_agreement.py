"""Does a quantized base (in torch or inside an engine's program) still give the zeroth-order
estimate the float base gives? At one point of a real run's weights and its first training
batches, the one-sided directional derivatives d_j = (L(w + eps u_j) - L(w)) / eps along the
same keys u_j (the run's own, so every base sees the same directions), through each engine /
base, against the float torch base at its default eps: their correlation and their size.

    python benchmarks/fd_agreement.py --cases torch:none:1e-3 onnxruntime:int8-dynamic:1e-3 \\
        [--flags '--lora-layers 4'] [--steps 2] [--out fd_agreement.md]

A case is engine:scheme:eps. One process; the data is SST-2 k=16 seed 42 (../shared/data).
LoRA B is set to small random values first (std 0.01: a trained-like point; at B = 0 a
perturbation of A moves nothing).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from _run import ROOT, write_table

sys.path.insert(0, str(ROOT))
from pocketllm import cli  # noqa: E402
from pocketllm import config as C  # noqa: E402
from pocketllm.bench.machine import describe  # noqa: E402
from pocketllm.data import Batcher  # noqa: E402
from pocketllm.data.source import load_run_data  # noqa: E402
from pocketllm.loss import is_masked_lm  # noqa: E402
from pocketllm.methods import get_method, setting_classes, settings_for  # noqa: E402
from pocketllm.models import load_model  # noqa: E402

BASE = ("--task sst2 --k 16 --seed 42 --method prge --estimator fzoo --queries 8 "
        "--batch-size 2 --perturbation rademacher --max-seq-length 256")


def build(flags: list[str]):
    """The ZO method a `pocketllm train` with `flags` would run, and its training batches."""
    ns = cli.build_parser().parse_args(["train", *flags])
    vars(ns).pop("what", None)
    args, rest = C.resolve_with(C.TrainArgs, ns, *setting_classes())
    cls = get_method(args.method)
    cfg = cls.resolve(args, settings_for(args.method, rest))
    cls.prepare(args, cfg)
    data = load_run_data(args)
    model, tok = load_model(args.model, args.dtype, cls.load_scheme(args, cfg))
    enc = data.encode(tok, is_masked_lm(model), args.max_seq_length, args.mask_prompt)
    objective = data.objective(tok)
    _, params = cls.trainable(model, args)
    method = cls(model, params, cfg, args, objective)
    return method, Batcher(enc["train"].items, args.batch_size, args.seed, tok.pad_token_id,
                           1, objective.collate)


def derivatives(method, batches, steps: int, eps: float) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained-like point, the same for every case
        for name, p in method.params:
            if name.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    out, at = [], []
    for step in range(steps):
        L, _, _ = method.probe_losses([batches(step)], method.keys(step), eps)
        out += [(x - L[0]) / eps for x in L[1:]]  # fzoo: replica 0 is the unperturbed one
        at.append(L[0])
    return torch.tensor(out, dtype=torch.float64), sum(at) / len(at)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["torch:none:1e-3",
                                                   "onnxruntime:int8-dynamic:1e-3"])
    ap.add_argument("--flags", default="", help="more `pocketllm train` flags for every case")
    ap.add_argument("--steps", type=int, default=2, help="batches (8 directions each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="", help="--program-cache for the engines")
    ap.add_argument("--out", default="fd_agreement.md")
    a = ap.parse_args()
    rows, ref, above = [], None, None
    for case in a.cases:
        engine, scheme, eps = case.split(":")
        flags = shlex.split(BASE) + shlex.split(a.flags) + [
            "--engine", engine, "--quantize-base", scheme, "--threads", str(a.threads),
            "--adapter-path", "/tmp/fd_agreement"]
        if a.cache:
            flags += ["--program-cache", a.cache]
        t0 = time.time()
        method, batches = build(flags)
        d, loss = derivatives(method, batches, a.steps, float(eps))
        method.close()
        if ref is None:
            ref = above = d  # the first case is the reference

        def corr(x):
            return f"{float(torch.corrcoef(torch.stack([x, d]))[0, 1]):+.3f}"
        rows.append([engine, scheme, eps, len(d), f"{loss:.4f}", corr(ref),
                     f"{float(d.norm() / ref.norm()):.2f}", corr(above),
                     f"{float(d.mean()):+.3f}", f"{time.time() - t0:.0f}"])
        above = d
        print(rows[-1], flush=True)
    write_table(a.out, "The zeroth-order estimate on a quantized base, against the float base's",
                "python benchmarks/fd_agreement.py " + " ".join(shlex.quote(x)
                                                               for x in sys.argv[1:]),
                describe(), ["engine", "--quantize-base", "eps", "directions", "loss L(w)",
                             "correlation with the first row", "size against the first row",
                             "correlation with the row above", "mean d_j", "s (with export)"],
                rows, f"""
d_j = (L(w + eps u_j) - L(w)) / eps, FZOO's one-sided differences, along the run's first
{a.steps} steps' keys (8 Rademacher directions a step) on its first {a.steps} batches
(`pocketllm train {BASE} {a.flags}`), LoRA B set to std-0.01 random values, the same for
every case. "Correlation" and "size" (the ratio of the vectors' norms) are against the first
row ("the row above": the same against the previous case, e.g. the same base at another eps:
a smooth loss gives the same differences at two small eps, a rounded one does not). A base that
keeps the estimate has correlation near the float base's own at another eps and size near 1.
""")


if __name__ == "__main__":
    main()
