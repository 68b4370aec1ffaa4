"""The float32 matrix products of the default model's step, one thread: torch (its BLAS) against
ONNX Runtime (its own MLAS kernels), each shape timed in turn in one process. Why an engine
program's step can be faster than torch's on one CPU and not on another: the step is mostly
these products (benchmarks/results/engine_quant.md), and each library picks its kernels by CPU.

    python benchmarks/gemm_libs.py [--repeats 30]

Writes benchmarks/results/gemm_libs.md."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._run import write_table  # noqa: E402
from benchmarks.engines import machine  # noqa: E402

# (rows, inner, outer): the prge q=4 step's shapes at batch 2 x 64 (5 replicas: 640 rows) of
# SmolLM2-135M: q/o projection, k/v projection, MLP up, MLP down, a head chunk
SHAPES = [(640, 576, 576), (640, 576, 192), (640, 576, 1536), (640, 1536, 576),
          (640, 576, 4096)]


def median_s(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper
    torch.set_num_threads(1)
    where = machine()
    blas = next((l.split("BLAS_INFO=")[1].split(",")[0] for l in
                 torch.__config__.show().splitlines() if "BLAS_INFO=" in l), "?")
    rows = []
    for m, k, n in SHAPES:
        x, w = torch.randn(m, k), torch.randn(k, n)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [numpy_helper.from_array(w.numpy(), "w")])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), opts,
            providers=["CPUExecutionProvider"])
        xn = x.numpy()
        t_torch = median_s(lambda: x @ w, a.repeats)
        t_ort = median_s(lambda: sess.run(None, {"x": xn}), a.repeats)
        gflop = 2 * m * k * n / 1e9
        rows.append([f"{m} x {k} x {n}", f"{t_torch * 1e3:.2f} ({gflop / t_torch:.0f})",
                     f"{t_ort * 1e3:.2f} ({gflop / t_ort:.0f})", f"{t_torch / t_ort:.2f}x"])
        print(rows[-1], flush=True)
    end = time.strftime("%H:%M:%S")
    write_table("gemm_libs.md", "float32 matrix products, one thread: torch against ONNX Runtime",
                "python benchmarks/gemm_libs.py " + " ".join(sys.argv[1:]),
                f"{where}; ended {end} UTC",
                ["rows x inner x outer", f"torch ({blas}) ms (GFLOP/s)",
                 f"onnxruntime {ort.__version__} ms (GFLOP/s)", "torch / onnxruntime"], rows,
                f"""
Median of {a.repeats} calls after one untimed, each library in turn per shape, one thread,
float32; ONNX Runtime times include its call overhead (inputs passed as numpy arrays).
""")


if __name__ == "__main__":
    main()
