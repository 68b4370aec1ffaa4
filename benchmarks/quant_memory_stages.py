"""Where a quantized-base ZO-LoRA process's memory goes: peak RSS (VmHWM) and RSS after each
stage, every stage measured in a fresh process of its own (what the stages before it cost
plus what it adds).

    python benchmarks/quant_memory_stages.py [--model smollm2-135m] [--quantize-base int4]

Stages: the interpreter; `import torch`; pocketllm and transformers' modeling of the model's
architecture without and with pocketllm's lean import (POCKETLLM_LEAN_IMPORT=0: transformers
then imports torchao and scipy, pocketllm/lean_import.py); + the tokenizer; + the model loaded
and quantized (`load_model`, the tokenizer with it). The step on top is
benchmarks/quant_memory.py's "peak run". Writes benchmarks/results/quant_memory_stages.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # (a child imports nothing before its stage)

STAGES = {  # name -> (what it does, extra environment)
    "python": ("the interpreter", {}),
    "torch": ("import torch", {}),
    "modeling-full": ("import pocketllm, transformers' modeling (torchao, scipy imported)",
                      {"POCKETLLM_LEAN_IMPORT": "0"}),
    "modeling": ("import pocketllm, transformers' modeling (lean import)", {}),
    "tokenizer": ("+ the tokenizer", {}),
    "model": ("+ the model, quantized as it loads (load_model)", {}),
}


def child(stage: str, model: str, scheme: str) -> None:
    if stage != "python":
        import torch  # noqa: F401
    if stage not in ("python", "torch"):
        import pocketllm.workload  # noqa: F401  (what the workload imports)
        from pocketllm import lean_import
        lean_import.install()  # as the workload's main() does (off with POCKETLLM_LEAN_IMPORT=0)
        from pocketllm import memory
        from pocketllm.models import load_config
        memory.tune_allocator()
        cfg = load_config(model)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]  # imports the architecture's modeling module
    if stage == "tokenizer":
        from pocketllm.models import load_tokenizer
        load_tokenizer(model)
    if stage == "model":
        from pocketllm.models import load_model
        load_model(model, "float32", scheme)
    status = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            status[line.split(":")[0]] = int(line.split()[1]) / 1024
    print(json.dumps({"stage": stage, "sys_modules": sorted(
        {m.split(".")[0] for m in sys.modules} & {"torchao", "scipy", "sympy"}), **status}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantize-base", default="int4")
    ap.add_argument("--child", default="")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.model, a.quantize_base)
    from _run import write_table

    from pocketllm.bench.machine import describe
    rows, load = [], os.getloadavg()[0]
    for stage, (what, env) in STAGES.items():
        out = subprocess.run([sys.executable, __file__, "--child", stage, "--model", a.model,
                              "--quantize-base", a.quantize_base], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
        if out.returncode != 0:
            raise SystemExit(f"stage {stage} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([stage, what, f"{r['VmHWM']:.0f}", f"{r['VmRSS']:.0f}",
                     ", ".join(r["sys_modules"]) or "-"])
        print(rows[-1], flush=True)
    write_table("quant_memory_stages.md", f"Where the memory goes: {a.model}, "
                f"--quantize-base {a.quantize_base}, stage by stage",
                "python benchmarks/quant_memory_stages.py " + " ".join(sys.argv[1:]),
                describe(), ["stage", "what", "peak RSS MB", "RSS MB", "of torchao/scipy/sympy"],
                rows, f"""
Each stage in a fresh process; it includes every stage above it (but `modeling-full`, the
`modeling` stage without pocketllm's lean import). Memory does not depend on the machine's load
(1-minute load average at the start: {load:.1f}, 2 cores). The step's own memory on top of the
`model` stage: benchmarks/results/quant_memory.md ("peak run" against "loaded").
""")


if __name__ == "__main__":
    main()
