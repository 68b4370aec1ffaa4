"""Is a quantized base's loss smooth enough for a zeroth-order finite difference? The projected
gradient (L(theta + eps z) - L(theta - eps z)) / (2 eps) along one LoRA direction z, at several
eps, on a float / int8 / int4 base. On a smooth loss it settles as eps shrinks; on a loss
rounded to a staircase (bfloat16 activations) it grows like 1/eps.

    python benchmarks/quant_fd_noise.py [--model smollm2-135m] [--batch 4] [--seq 64]

One process, one batch of SST-2-like random tokens, LoRA rank 8 on q/v with B = 0.02 z0 (a
trained-like point) and the same direction z for every base. Writes
benchmarks/results/quant_fd_noise.md.
"""

from __future__ import annotations

import argparse
import sys

import torch

from _run import ROOT, write_table

sys.path.insert(0, str(ROOT))
from pocketllm.bench.machine import describe  # noqa: E402
from pocketllm.config import TrainArgs  # noqa: E402
from pocketllm.loss import group_losses  # noqa: E402
from pocketllm.models import load_model  # noqa: E402
from pocketllm.objectives import LanguageModeling  # noqa: E402
from pocketllm.trainable import setup_trainable  # noqa: E402
from pocketllm.workload import fixed_batch  # noqa: E402

EPS = (1e-2, 1e-3, 1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--schemes", default="none,int8,int4")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for scheme in a.schemes.split(","):
        model, _ = load_model(a.model, "float32", scheme)
        batch = fixed_batch(model.config.vocab_size, a.batch, a.seq)
        torch.manual_seed(0)  # the same LoRA init for every base
        _, params = setup_trainable(model, TrainArgs(model=a.model, trainable="lora",
                                                     lora_rank=8))
        ps = [p for _, p in params]
        g = torch.Generator().manual_seed(1)
        start = [torch.randn(p.shape, generator=g) * 0.02 for p in ps]
        z = [torch.randn(p.shape, generator=g) for p in ps]

        def loss(eps: float) -> float:
            with torch.no_grad():
                for p, s0, zi in zip(ps, start, z):
                    p.copy_(s0 + eps * zi)
                return float(group_losses(LanguageModeling().stats(model, batch), 1))

        g_eps = [(loss(e) - loss(-e)) / (2 * e) for e in EPS]
        rows.append([scheme, f"{loss(0.0):.5f}", *[f"{x:+.3f}" for x in g_eps]])
        print(rows[-1], flush=True)
        del model
    write_table("quant_fd_noise.md", "The finite difference on a quantized base",
                "python benchmarks/quant_fd_noise.py " + " ".join(sys.argv[1:]), describe(),
                ["--quantize-base", "loss", *[f"projected grad, eps {e:g}" for e in EPS]],
                rows, f"""
{a.model}, float32 rest, LoRA rank 8 on q_proj / v_proj at a fixed point (A and B random,
std 0.02), one direction z (standard normal) shared by every base, {a.batch} x {a.seq} random
tokens, every position scored (the workload's batch). The projected gradient is
(L(+eps) - L(-eps)) / (2 eps). int4's 4-bit matmul takes and returns bfloat16
(pocketllm/quantize.py); int8 (torchao) and float keep float32 activations.
""")


if __name__ == "__main__":
    main()
