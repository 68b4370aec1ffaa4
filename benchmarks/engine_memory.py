"""What each runtime option does to an engine program's memory: a cached default-model zo-sgd
program (batch 2 x 64, every position scored) loaded and run once in a fresh process of its own
per option, its peak RSS (VmHWM) after the load and after the run. The process imports
torch first, as a pocketllm host does (the ExecuTorch pybinding imports it anyway).

    python benchmarks/engine_memory.py --cache DIR [--threads 2]
    python benchmarks/engine_memory.py --cache DIR --W 5 --engines onnxruntime --options \
        "defaults (before)" "no constant folding" "no memory pattern" \
        "no constant folding + no memory pattern (the engine's load)"   # -> engine_memory_W5.md

DIR holds the programs (`benchmarks/engines.py --cache DIR` fills it); `.onnx` variants with
external data are written next to them (`*.ext.onnx` + `.data`)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._run import write_table  # noqa: E402
from benchmarks.engines import machine  # noqa: E402

NO_FOLDING = {"disabled_optimizers": ["ConstantFolding"]}  # an InferenceSession argument
# option name -> ONNX Runtime SessionOptions settings (attributes, then config entries, then
# InferenceSession arguments)
ORT_OPTIONS = {
    "defaults (before)": ({}, {}),
    "no CPU memory arena": ({"enable_cpu_mem_arena": False}, {}),
    "no memory pattern": ({"enable_mem_pattern": False}, {}),
    "no prepacking": ({}, {"session.disable_prepacking": "1"}),
    "initializers outside the arena": ({}, {"session.use_device_allocator_for_initializers": "1"}),
    "external data file": ({}, {}),
    "external data + no arena + no pattern": ({"enable_cpu_mem_arena": False,
                                               "enable_mem_pattern": False}, {}),
    "external data + no prepacking": ({}, {"session.disable_prepacking": "1"}),
    "int8 dynamic MatMul weights (quantize_dynamic)": ({}, {}),
    "no constant folding": ({}, {}, NO_FOLDING),
    "no constant folding + no memory pattern (the engine's load)": (
        {"enable_mem_pattern": False}, {}, NO_FOLDING),
}
ET_OPTIONS = ("path (mmap data loader)", "bytes (read into memory)", "path, minimal verification")

CHILD = r'''
import json, sys, time
import torch
from pocketllm.engines.program import INPUTS, Shapes, program_inputs
from pocketllm.workload import fixed_batch
spec = json.loads(sys.argv[1])
key = json.load(open(spec["record"]))["key"]
s = Shapes(**key["shapes"])
torch.set_num_threads(spec["threads"])
P = sum(a * b for _, (a, b) in key["trained"])
n = len(key["trained"])
inputs = program_inputs(fixed_batch(49152, 2, 64), False, s)
inputs += [torch.zeros(P), torch.zeros(1), torch.ones(s.W, n, dtype=torch.int64),
           torch.ones(s.W, n, dtype=torch.int64), torch.full((s.W,), 1e-3)]
inputs = dict(zip(INPUTS, inputs))
def peak():  # VmHWM: this process's own (ru_maxrss carries the parent's over fork + exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status")
                if l.startswith("VmHWM")) / 1024
base = peak()
t0 = time.perf_counter()
if spec["engine"] == "onnxruntime":
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = spec["threads"], 1
    for k, v in spec["attrs"].items():
        setattr(o, k, v)
    for k, v in spec["config"].items():
        o.add_session_config_entry(k, v)
    sess = ort.InferenceSession(spec["path"], o, providers=["CPUExecutionProvider"],
                                **spec.get("kwargs", {}))
    names = [i.name for i in sess.get_inputs()]
    run = lambda: sess.run(None, {k: inputs[k].numpy() for k in names})
else:
    from executorch.runtime import Runtime, Verification
    from executorch.extension.pybindings import portable_lib
    portable_lib._unsafe_reset_threadpool(spec["threads"])
    rt = Runtime.get()
    how = spec["how"]
    src = open(spec["path"], "rb").read() if how.startswith("bytes") else spec["path"]
    kw = {"verification": Verification.Minimal} if "minimal" in how else {}
    prog = rt.load_program(src, **kw)  # (it holds the bytes the method reads)
    method = prog.load_method("forward")
    del src
    run = lambda: method.execute(list(inputs.values()))
load_s = time.perf_counter() - t0
loaded = peak()
run()
t0 = time.perf_counter()
out = run()
print(json.dumps({"imports": base, "loaded": loaded, "run": peak(), "load_s": load_s,
                  "call_s": time.perf_counter() - t0,
                  "losses": [float(v) for v in out[0].reshape(-1)]}))
'''


def measure(spec: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                       text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def external(path: Path) -> Path:
    """`path` re-saved with its initializers in one external data file (written once)."""
    out = path.with_suffix(".ext.onnx")
    if not out.exists():
        import onnx
        model = onnx.load(str(path))
        onnx.save_model(model, str(out), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=out.name + ".data",
                        size_threshold=1024)
    return out


def quantized(path: Path) -> Path:
    """`path` with its constant MatMul weights quantized to int8 by ONNX Runtime's
    `quantize_dynamic` (activations quantized per call; the LoRA inputs and the head's
    chunks of the embedding, which are not initializers of a MatMul, stay float)."""
    out = path.with_suffix(".int8.onnx")
    if not out.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(external(path)), str(out), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    return out


def program(cache: Path, engine: str, W: int) -> tuple[Path, Path]:
    for rec in sorted(cache.glob("*.json")):
        key = json.loads(rec.read_text())["key"]
        if (key.get("engine") == engine and key["shapes"]["W"] == W and
                key["shapes"]["C"] == 0 and "kind" not in key and "quantize" not in key and
                ("layout" not in key or W != 2)):
            # (ONNX, W 2: the single-file program, as pocketllm wrote it before its weights
            # moved to a data file, the options' rows convert it; else as the cache has it)
            return rec.with_suffix(".onnx" if engine == "onnxruntime" else ".pte"), rec
    raise SystemExit(f"no {engine} zo-sgd program (W={W}) in {cache}")


FIRST: dict[str, list[float]] = {}  # each engine's first row's losses


def row(engine: str, option: str, r: dict, rows: list) -> list:
    ref = FIRST.setdefault(engine, r["losses"])
    gap = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ref))
    out = [engine, option, f"{r['imports']:.0f}", f"{r['loaded']:.0f}", f"{r['run']:.0f}",
           f"{r['load_s']:.1f}", f"{r['call_s']:.2f}", f"{gap:.1e}"]
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--W", type=int, default=2, help="the program's replicas (2: zo-sgd's; "
                    "5: prge q=4's)")
    ap.add_argument("--engines", nargs="*", default=["onnxruntime", "executorch"])
    ap.add_argument("--options", nargs="*", default=None, help="these rows only (names)")
    a = ap.parse_args()
    cache = Path(a.cache)
    where = machine()
    rows = []
    keep = lambda name: a.options is None or name in a.options
    if "onnxruntime" in a.engines:
        path, rec = program(cache, "onnxruntime", a.W)
        for name, (attrs, config, *kwargs) in ORT_OPTIONS.items():
            if not keep(name):
                continue
            p = (external(path) if name.startswith("external") else
                 quantized(path) if name.startswith("int8") else path)
            rows.append(row("onnxruntime", name, measure(
                {"engine": "onnxruntime", "path": str(p), "record": str(rec),
                 "threads": a.threads, "attrs": attrs, "config": config,
                 "kwargs": kwargs[0] if kwargs else {}}), rows))
    if "executorch" in a.engines:
        path, rec = program(cache, "executorch", a.W)
        for how in filter(keep, ET_OPTIONS):
            rows.append(row("executorch", how, measure(
                {"engine": "executorch", "path": str(path), "record": str(rec),
                 "threads": a.threads, "how": how}), rows))
    end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    name = "engine_memory.md" if a.W == 2 else f"engine_memory_W{a.W}.md"
    write_table(name, "Engine runtime options: peak RSS of a program alone",
                "python benchmarks/engine_memory.py " + " ".join(sys.argv[1:]),
                f"{where}; at end: {end}",
                ["engine", "option", "peak after imports MB", "peak after load MB",
                 "peak after 2 calls MB", "load s", "call s",
                 "loss rel. gap to the engine's first row"], rows,
                NOTES.replace("zo-sgd program (W 2", f"program (W {a.W}"))


NOTES = """
Each row is a fresh process (torch imported first, as a pocketllm host has it) that loads the
default model's zo-sgd program (W 2, batch 2 x 64, 128 scored positions, whole vocabulary) and
calls it twice; peak RSS is VmHWM, unaffected by the machine's load (the seconds are: a
rough guide only). The loss gap compares the program's per-replica losses (random tokens,
LoRA B = 0) with the engine's first row: 0 (or rounding) for a float option, the quantization's
own error for the int8 row.
"""


if __name__ == "__main__":
    main()
