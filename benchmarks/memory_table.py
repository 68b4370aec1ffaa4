"""Peak RSS of inference and of each training method at the same batch, each in a fresh process.

    python benchmarks/memory_table.py [--model smollm2-135m] [--batch-size 8] [--seq 64] [--dtype float32]
    python benchmarks/memory_table.py --rows inference zo-lora lora-adam lora-adam-ckpt \
        --repeats 3 --out memory_mebp.md
    python benchmarks/memory_table.py --models smollm2-135m:16x128 random:opt-1.3b:2x64 ... \
        [--estimate-only random:opt-1.3b:16x128] --out memory_models.md

"peak (run)" is the high-water mark from just after loading through a few steps (the kernel's
counter is reset once the model is in memory), which is what tells the methods apart; "peak
(process)" also includes loading the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

from _run import run_mode, write_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pocketllm.bench.machine import describe  # noqa: E402

class Peak(NamedTuple):
    """A run of the peak table: `python -m pocketllm.workload --method M --trainable T` with the
    method's `settings` (flags), in an environment with `env` added."""

    key: str
    method: str
    trainable: str
    label: str
    settings: dict = {}
    env: dict = {}


# glibc serving every block of 1 MB or more by mmap (returned to the system when freed) instead
# of `memory.tune_allocator`'s 32 MB: what the heap's fragmentation costs a run
MMAP_1MB = {"POCKETLLM_MALLOC_TUNE": "0", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold="
            "1048576:glibc.malloc.trim_threshold=1073741824"}
CKPT = {"activation_checkpointing": True}
# the peak table's runs; the first is the yardstick
PEAKS = [Peak("inference", "inference", "full", "inference (forward + loss, no grad)"),
         Peak("zo-full", "zo-sgd", "full", "zo-sgd, full parameters"),
         Peak("zo-lora", "zo-sgd", "lora", "zo-sgd, LoRA r=8 q/v"),
         Peak("naive-zo", "naive-zo", "full", "naive MeZO reference, full parameters"),
         Peak("lora-adam", "lora-adam", "lora", "lora-adam (backprop), LoRA r=8 q/v"),
         Peak("lora-adam-ckpt", "lora-adam", "lora",
              "lora-adam --activation-checkpointing (MeBP), LoRA r=8 q/v", CKPT)]
# runs only where --rows names them
OPTIONAL = [Peak("lora-adam-ckpt-mmap1", "lora-adam", "lora",
                 "lora-adam --activation-checkpointing, glibc mmap threshold 1 MB", CKPT,
                 MMAP_1MB)]


# (method, trainable, label) of the estimate-vs-measurement table
RUNS = [("inference", "full", "inference"),
        ("zo-sgd", "full", "zo-sgd full"),
        ("zo-sgd", "lora", "zo-sgd LoRA r=8"),
        ("lora-adam", "lora", "lora-adam r=8"),
        ("adam", "full", "adam (full)")]
# --reuse: workload JSON written before the workload took --method/--trainable (the committed
# memory_models_measured.jsonl) names each run by a mode; these are RUNS' modes
OLD_MODES = {"inference": ("inference", "full"), "zo-full": ("zo-sgd", "full"),
             "zo-lora": ("zo-sgd", "lora"), "lora-adam": ("lora-adam", "lora"),
             "adam": ("adam", "full")}


def _run_of(r: dict) -> tuple[str, str]:
    """(method, trainable) of a workload result, old (mode) or new."""
    return OLD_MODES[r["mode"]] if "mode" in r else (r["method"], r["trainable"])


def models_table(a) -> None:
    """Estimated vs measured peak RSS for each model x dtype x run (`--models`)."""
    import json
    import os

    from pocketllm.memory_estimate import Inference, estimate, framework_mb
    from pocketllm.methods import REGISTRY
    from pocketllm.models import load_config

    load_start = os.getloadavg()
    framework = framework_mb()
    reused = {}
    if a.reuse:
        for line in Path(a.reuse).read_text().splitlines():
            r = json.loads(line)
            reused[(r["model"], r["dtype"], *_run_of(r), r["batch"], r["seq"])] = r
    rows, n_reused = [], 0
    for spec in a.models:
        name, _, size = spec.rpartition(":")
        batch, seq = (int(x) for x in size.split("x"))
        cfg = load_config(name)
        for dtype in a.dtypes:
            for method, trainable, label in RUNS:
                entry = {Inference.name: Inference, **REGISTRY}[method]
                est = estimate(cfg, entry, trainable, batch, seq, dtype, framework=framework)
                key = (name, dtype, method, trainable, batch, seq)
                r = None
                if spec in a.estimate_only:
                    why = "estimate only (MeZO's batch: too slow to run on this CPU)"
                elif est.total > a.measure_below:
                    why = f"estimate only (> {a.measure_below / 1024:.0f} GiB: does not fit now)"
                elif key in reused:
                    r, why = reused[key], "measured"
                    n_reused += 1
                elif a.reuse_only:
                    why = "estimate only (not run in this session's time)"
                else:
                    r = run_mode(method, trainable=trainable, model=name, dtype=dtype,
                                 batch_size=batch, seq=seq, steps=1, warmup=est.warmup)
                    why = "measured"
                    print(json.dumps(r), flush=True)
                meas = max(r["peak_run_mb"], r["rss_loaded_mb"]) if r else None
                c = est.components
                act = sum(v for k, v in c.items() if "activation" in k or "temporar" in k
                          or "scratch" in k or "heap" in k)
                state = sum(v for k, v in c.items() if "gradient" in k or "optimizer" in k
                            or "AdamW" in k)
                rows.append([name, f"{batch} x {seq}", dtype, label,
                             f"{c['weights'] + c.get('LoRA weights (float32)', 0):.0f}",
                             f"{act:.0f}", f"{state:.0f}", f"{est.total:.0f}",
                             f"{meas:.0f}" if meas else "-",
                             f"{(est.total - meas) / meas:+.1%}" if meas else "-",
                             f"{r['step_s_median']:.1f}" if r else "-", why])
                print(rows[-1], flush=True)
    cmd = "python benchmarks/memory_table.py " + " ".join(sys.argv[1:])
    notes = MODELS_NOTES.format(framework=framework, load_start=_load(load_start),
                                load_end=_load(os.getloadavg()), reuse=a.reuse or "-",
                                n_reused=n_reused)
    write_table(a.out, "Peak RSS: estimated (`pocketllm memory`) and measured", cmd.strip(),
                describe(), ["model", "batch x seq", "dtype", "run", "weights MB",
                             "activations MB", "grads + AdamW MB", "estimate MB", "measured MB",
                             "estimate error", "step s", ""], rows, notes)


def _load(avg) -> str:
    return " / ".join(f"{x:.2f}" for x in avg)


MODELS_NOTES = """
Estimate: `pocketllm memory --model M --method X --trainable T --batch-size B
--max-seq-length L --dtype D` (pocketllm/memory_estimate.py: from the config alone; the
framework's own footprint, {framework:.0f} MB, measured once in a fresh process). Measured:
peak RSS of `python -m pocketllm.workload --method X --trainable T --model M --dtype D
--batch-size B --seq L --steps 1 --warmup W` in a fresh process (W = 1 for lora-adam and adam,
so AdamW's state exists; 0 otherwise; the smollm2-135m lora-adam rows ran with W = 0: LoRA's AdamW state is 4 MB
either way), from just after loading (the kernel's high-water mark is reset there)
through the step, or the loaded RSS if larger. Batches: random tokens; causal LMs score every
position (the dense language-modelling case), RoBERTa one <mask> per row through its MLM head.
zo-sgd runs its defaults (`--zo-passes auto`): one pair-batched forward (activations of 2 x B
rows) for LoRA, and for full parameters where that adds at most 5% to the estimated peak
(OPT-1.3B at 2 x 64, RoBERTa-large at 8 x 64), else sequential passes (smollm2-135m at
16 x 128). `random:` models have the published configs
of facebook/opt-1.3b and FacebookAI/roberta-large with random weights (no pretrained weights
here, and none are needed to measure memory); smollm2-135m is the real default model.

Sizes: smollm2-135m at 16 x 128 (MeZO's batch 16); OPT-1.3B and RoBERTa-large were measured at
smaller batches (2 x 64, 8 x 64) because one forward of OPT-1.3B at 16 x 128 takes minutes on
this shared 2-core CPU, and are given as estimates at 16 x 128. Runs whose estimate exceeds the
memory free on this shared 24 GB machine were not run. Load average (1/5/15 min) at start:
{load_start}; at end: {load_end}. Measurements taken from {reuse}: {n_reused} (the same
workload command, run by a queue earlier in the session, whose start times and load averages are
in memory_models_queue.log; the rest ran here). Each line of the JSONL says which build measured
it: the smollm2-135m inference and zo-sgd rows and every zo-sgd full row were re-measured after
the allocator tuning (memory.tune_allocator), the in-place loss buffers and the `auto` passes
rule; the first-order rows and the OPT/RoBERTa inference and LoRA rows are from the earlier build
(their code paths did not change; the allocator setting did).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=[],
                    help="NAME:BxL ...: the estimate-vs-measurement table of every run")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--estimate-only", nargs="*", default=[], help="NAME:BxL entries not run")
    ap.add_argument("--measure-below", type=float, default=9000.0,
                    help="run only where the estimate is below this many MB")
    ap.add_argument("--reuse", default="", help="JSONL of workload results to take measurements "
                    "from (same model, dtype, mode, batch, seq) instead of running them")
    ap.add_argument("--reuse-only", action="store_true",
                    help="run nothing: what --reuse lacks is left as estimate only")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=[p.key for p in PEAKS],
                    help="the peak table's runs, by key (the first is the yardstick): "
                    + " ".join(p.key for p in PEAKS + OPTIONAL))
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure each run this many times (peak RSS under autograd varies "
                    "~100 MB run to run: glibc's heap); the table gives medians")
    ap.add_argument("--out", default="memory.md")
    a = ap.parse_args()
    if a.models:
        return models_table(a)
    peaks_table(a)


def _measure(peak: Peak, a) -> dict:
    saved = {k: os.environ.get(k) for k in peak.env}
    os.environ.update(peak.env)  # the fresh process inherits it
    try:
        return run_mode(peak.method, trainable=peak.trainable, model=a.model,
                        batch_size=a.batch_size, seq=a.seq, dtype=a.dtype, steps=a.steps,
                        **peak.settings)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


ESTIMATE_NOTE = """
"estimate": `pocketllm memory --method M --trainable T` with the run's settings (the framework's
footprint measured once in a fresh process); "-" for a run that is not a method, or one in an
environment the estimate does not model.
"""
MMAP_NOTE = """
"glibc mmap threshold 1 MB": the run with POCKETLLM_MALLOC_TUNE=0 and
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=1073741824 in its
environment: every block of 1 MB or more is mapped on its own and given back when freed (the
package's own setting, `memory.tune_allocator`, serves blocks up to 32 MB from the heap, which
keeps what it frees). The difference is what the heap's fragmentation costs that run; the price
is a page fault per page of every such block.
"""


def _estimate(peak: Peak, a) -> float | None:
    """`pocketllm memory`'s estimate of a run (None: not a method, or run in an environment
    the estimate does not model)."""
    from pocketllm.memory_estimate import Inference, estimate, framework_mb
    from pocketllm.methods import REGISTRY
    from pocketllm.models import load_config
    entry = {Inference.name: Inference, **REGISTRY}.get(peak.method)
    if entry is None or peak.env:
        return None
    return estimate(load_config(a.model), entry, peak.trainable, a.batch_size, a.seq, a.dtype,
                    framework=framework_mb(), **peak.settings).total


def peaks_table(a) -> None:
    """Peak RSS and step time of each run (`--rows`), `--repeats` times each, round robin."""
    by_key = {p.key: p for p in PEAKS + OPTIONAL}
    unknown = [k for k in a.rows if k not in by_key]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {sorted(by_key)}")
    peaks = [by_key[k] for k in a.rows]
    load_start = os.getloadavg()
    res: dict[str, list[dict]] = {p.key: [] for p in peaks}
    for _ in range(a.repeats):  # round robin: a busy spell on the machine hits every run alike
        for p in peaks:
            res[p.key].append(_measure(p, a))
            print(p.label, res[p.key][-1], flush=True)

    def peak(key):
        return statistics.median(r["peak_run_mb"] for r in res[key])

    def step(key, best=False):
        times = [r["step_s_median"] for r in res[key]]
        return min(times) if best else statistics.median(times)
    inf = peak(peaks[0].key)
    rows = []
    for p in peaks:
        r = res[p.key]
        est = _estimate(p, a)
        row = [p.label, f"{peak(p.key):.0f}", f"{est:.0f}" if est else "-"]
        if a.repeats > 1:
            row.append(" / ".join(f"{x['peak_run_mb']:.0f}" for x in r))
        row += [f"{peak(p.key) / inf:.3f}",
                f"{statistics.median(max(x['peak_run_mb'], x['peak_load_mb']) for x in r):.0f}",
                f"{step(p.key):.2f}"]
        if a.repeats > 1:
            row.append(f"{step(p.key, best=True):.2f}")
        rows.append(row)
    header = ["run", "peak RSS (run) MB", "estimate MB"] + (
        ["each run MB"] if a.repeats > 1 else []) + [
        "vs inference", "peak RSS (process) MB", "step s"] + (
        ["fastest step s"] if a.repeats > 1 else [])
    notes = __doc__.split("\n\n", 2)[2] + ESTIMATE_NOTE
    if any(p.env for p in peaks):
        notes += MMAP_NOTE
    if a.repeats > 1:
        notes += (f"\nEach run {a.repeats} times, round robin, each in a fresh process; "
                  "figures are medians over the runs (\"step s\": the median of each run's "
                  f"median step of {a.steps}, after one untimed step; \"fastest\": the "
                  "smallest of those). Load average (1/5/15 min) at start: "
                  f"{_load(load_start)}; at end: {_load(os.getloadavg())}.\n")
    if "lora-adam" in res and "lora-adam-ckpt" in res:
        notes += ("\nStep time, checkpointed / plain lora-adam: "
                  f"{step('lora-adam-ckpt') / step('lora-adam'):.2f} (medians), "
                  f"{step('lora-adam-ckpt', True) / step('lora-adam', True):.2f} (fastest).\n")
    cmd = "python benchmarks/memory_table.py " + " ".join(sys.argv[1:])
    write_table(a.out, f"Peak memory by method ({a.model}, {a.dtype}, batch {a.batch_size} x "
                f"{a.seq})", cmd.strip(), describe(), header, rows, notes)

if __name__ == "__main__":
    main()
