"""One zeroth-order step against its floor, two forward passes of the same batch.

For the default model at batch 8 x 64 tokens (every position scored), full-parameter and LoRA:
our step (z generated once per step by the fused counter-based kernel, +eps/-eps as one forward
over the batch twice, the update deferred into the next step's perturbation) against the naive
MeZO reference (per-tensor torch.normal regenerated four times a step, in-place perturbation).
Each configuration runs in a fresh process; the median of the timed steps is reported.

    python benchmarks/zo_step.py [--steps 5] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import sys

from _run import run_mode, write_table

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from pocketllm.bench.machine import describe  # noqa: E402
from pocketllm.zo import noise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    common = dict(model=a.model, seq=a.seq, steps=a.steps)
    B = a.batch_size
    t = {}
    for mode, b in [("inference", B), ("inference", 2 * B), ("inference-lora", B),
                    ("inference-lora", 2 * B), ("zo-full", B), ("naive-zo-full", B),
                    ("zo-lora", B), ("naive-zo-lora", B)]:
        r = run_mode(mode, batch_size=b, **common)
        t[(mode, b)] = r["step_s_median"]
        print(f"{mode:16s} batch {b:3d}: {r['step_s_median']:.3f} s/step", flush=True)
    rows = []
    for kind, inf in (("full", "inference"), ("lora", "inference-lora")):
        floor = 2 * t[(inf, B)]
        pair_floor = t[(inf, 2 * B)]
        for impl, mode in (("pocketllm", f"zo-{kind}"), ("naive MeZO", f"naive-zo-{kind}")):
            s = t[(mode, B)]
            rows.append([kind, impl, f"{s:.3f}", f"{floor:.3f}", f"{s / floor:.3f}",
                         f"{pair_floor:.3f}", f"{s / pair_floor:.3f}"])
    cmd = "python benchmarks/zo_step.py " + " ".join(sys.argv[1:])
    notes = f"""
- floor = 2 x one forward at batch {B} x {a.seq} (the issue's definition); pair floor = one
  forward at batch {2 * B} x {a.seq}, the batch our step actually runs (+eps rows and -eps rows),
  so `step / pair floor` is the overhead of perturbation and update alone.
- forward = backbone + chunked output head + loss over all {a.seq} positions (no full logits tensor).
- noise backend: {noise.backend()}; float32 weights; medians of {a.steps} steps after 1 warm-up
  step, each configuration in a fresh process.
"""
    write_table("zo_step.md", f"ZO step vs its floor ({a.model}, batch {B} x {a.seq})", cmd.strip(),
                describe(), ["trainable", "implementation", "step s", "floor s", "step/floor",
                             "pair floor s", "step/pair floor"], rows, notes)


if __name__ == "__main__":
    main()
