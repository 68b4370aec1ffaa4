"""The fused noise ops (pocketllm.zo.noise on the compiled kernel) on a model-sized tensor, against
torch's own `normal_`: seconds, best of a few runs, per dtype and distribution.

    python benchmarks/noise_kernel.py

Env: POCKETLLM_BENCH_N (elements, default 134.5M), POCKETLLM_BENCH_REPS (default 5).
(`python -m pocketllm.zo.kernel` only builds the kernel.)
"""

from __future__ import annotations

import os
import time

from _run import ROOT  # noqa: F401  (puts the repository on sys.path)


def main() -> None:
    import torch

    from pocketllm.zo import kernel, noise

    t0 = time.perf_counter()
    backend = noise.backend()  # builds (or loads) the kernel on first use
    where = kernel.load_error() or kernel.build_dir()
    print(f"backend: {backend} ({where}, {time.perf_counter() - t0:.2f} s)  "
          f"threads: {torch.get_num_threads()}")
    n = int(os.environ.get("POCKETLLM_BENCH_N", 134_500_000))
    reps = int(os.environ.get("POCKETLLM_BENCH_REPS", 5))

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    key, ukey = noise.derive_key(0, 1, 2), noise.derive_key(0, 0, 2)
    scratch = torch.empty(n)
    print(f"\n{n:,} elements, seconds (best of {reps}):")
    print(f"  torch normal_ float32: {best(lambda: scratch.normal_()):.4f}")
    print(f"  {'dtype':<9} {'dist':<10} {'add_noise_':>10} {'pair':>8} {'pair+upd':>9} "
          f"{'plus':>8} {'noise(out=)':>11}")
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(n).to(dtype)
        plus, minus = torch.empty_like(w), torch.empty_like(w)
        for dist in noise.DISTS:
            t_add = best(lambda: noise.add_noise_(w, key, 0, 1e-9, dist))
            t_pair = best(lambda: noise.perturb_pair(w, key, 0, 1e-3, dist, plus, minus))
            t_upd = best(lambda: noise.perturb_pair(w, key, 0, 1e-3, dist, plus, minus,
                                                    update_key=ukey, update_coef=1e-9))
            t_one = best(lambda: noise.perturb_pair(w, key, 0, 1e-3, dist, plus, None))
            t_gen = best(lambda: noise.noise(key, 0, n, dist, out=scratch)) if dtype == torch.float32 else None
            print(f"  {str(dtype)[6:]:<9} {dist:<10} {t_add:>10.4f} {t_pair:>8.4f} {t_upd:>9.4f} "
                  f"{t_one:>8.4f} {'' if t_gen is None else f'{t_gen:.4f}':>11}")
        del w, plus, minus


if __name__ == "__main__":
    main()
