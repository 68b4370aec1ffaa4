"""onnxruntime: the step's forward passes as one ONNX program (`program.StepProgram`: LoRA
replicas as inputs, noise generated inside, pocketllm's loss), exported with
`torch.onnx.export(dynamo=True)` and run by an ONNX Runtime `InferenceSession` with the run's
thread count. The pip extra `pocketllm[onnx]` installs the runtime."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .base import register
from .program import ProgramEngine, below, file_digest

DATA_SUFFIX = ".onnx.data"  # a program's weights: <digest>.onnx.data beside its graph


def _external(model):
    """The initializers of an ONNX model whose data lives in a file of their own (what
    `save_model(..., save_as_external_data=True)` moves: its Constant attributes stay)."""
    from onnx.external_data_helper import uses_external_data
    return [t for t in model.graph.initializer if uses_external_data(t)]


def _quiet_quantizer(module: str):
    """Import ONNX Runtime's quantizer `module` and return its logger. Importing it calls
    logging.basicConfig(level=INFO) on the root logger, which would make every library's INFO
    lines print in this process: undone here."""
    import importlib
    import logging
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    importlib.import_module(module)
    root.handlers[:] = handlers
    root.setLevel(root_level)
    return logging.getLogger(module)


def _base_matmuls(model, scheme: str) -> dict[str, int]:
    """{node name: input width} of the frozen base Linears: the MatMuls whose weight is a 2-D
    initializer. The LoRA products (their weights are inputs) and the head (blocks of the
    embedding table, int8 rows on a quantized base: `program.stores_tables`) are not."""
    from ..quantize import int4_group
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    found = {node.name: w[0] for node in model.graph.node if node.op_type == "MatMul"
             for w in [shapes.get(node.input[1])] if w is not None and len(w) == 2
             and int4_group(w[0])}
    if not found:
        raise ValueError(f"--quantize-base {scheme}: the program has no Linear to quantize")
    return found


def _weight_name(node) -> str:
    """The program buffer a MatMul's weight came from (`b_l3_q_proj`), as the exporter records
    the traced node in the ONNX node's metadata ('' when it does not)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.fx_node":
            m = re.search(r"args = \(%\w+, %(\w+)", p.value)
            return m.group(1) if m else ""
    return ""


def _weight_only(model, scheme: str, names: dict[str, int], first: int = 0):
    """MatMulNBits (com.microsoft, in the stock CPU runtime): `scheme`'s bits (int8: 8, int4:
    4) per weight, symmetric, one float scale per block of 128 inputs (64, 32 where the
    layer's width needs it: `quantize.int4_group`, as the torch int4 scheme groups), float32
    activations."""
    import logging
    from ..quantize import int4_group
    module = "onnxruntime.quantization.matmul_nbits_quantizer"
    log = _quiet_quantizer(module)
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)
    bits = {"int8": 8, "int4": 4}[scheme]
    by_block: dict[int, list[str]] = {}
    for name, width in names.items():
        by_block.setdefault(int4_group(width), []).append(name)
    level = log.level
    log.setLevel(logging.WARNING)  # (it logs every node of the graph at INFO)
    try:
        for block, group in sorted(by_block.items()):
            q = MatMulNBitsQuantizer(model, nodes_to_include=group, algo_config=
                                     DefaultWeightOnlyQuantConfig(block_size=block, bits=bits,
                                                                  is_symmetric=True))
            q.process()
            model = q.model.model
    finally:
        log.setLevel(level)
    return model


def _dynamic(model, scheme: str, names: dict[str, int], first: int = 0):
    """Below layer `first` (the first with a trained tensor, `program.below`): int8 weights per
    output channel, int8 activations quantized per call (ONNX Runtime's dynamic quantization:
    DynamicQuantizeLinear + MatMulInteger, fused at load into DynamicQuantizeMatMul /
    MatMulIntegerToFloat). Why it is the fast scheme: its integer GEMM runs on the CPU's int8
    units (AVX512-VNNI / AMX in ONNX Runtime's MLAS), where MatMulNBits here computes in
    float32 (benchmarks/results/engine_quant.md). From layer `first` on, where the replicas'
    activations differ by the perturbation, the weights are int8 with float activations
    (`_weight_only`): rounding the activations there swamps the finite differences."""
    import tempfile
    import onnx
    nodes = {n.name: n for n in model.graph.node}
    steady = [n for n in names if below(_weight_name(nodes[n]), first)]
    rest = {n: w for n, w in names.items() if n not in steady}
    if steady:
        _quiet_quantizer("onnxruntime.quantization.quantize")
        from onnxruntime.quantization import QuantType, quantize_dynamic
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_quantize=steady,
                             use_external_data_format=True)
            model = onnx.load(str(out))
    return _weight_only(model, "int8", rest) if rest else model


# scheme -> how the base Linears are rewritten (each scheme one entry)
QUANTIZERS = {"int8": _weight_only, "int4": _weight_only, "int8-dynamic": _dynamic}


def quantize_base(model, scheme: str, first: int = 0):
    """`model` (an ONNX ModelProto) with its frozen base Linears (`_base_matmuls`) stored in
    `scheme` (a key of `QUANTIZERS`); `first`: the program's first layer with a trained
    tensor (`StepProgram.first`; the layers below it see no perturbation)."""
    return QUANTIZERS[scheme](model, scheme, _base_matmuls(model, scheme), first)


@register("onnxruntime")
class OnnxRuntimeEngine(ProgramEngine):
    extra = "onnx"
    suffix = ".onnx"
    modules = ("onnxruntime", "onnx", "onnxscript")
    schemes = tuple(QUANTIZERS)  # `quantize_base`

    @staticmethod
    def versions() -> dict[str, str]:
        import onnx
        import onnxruntime
        import onnxscript
        # layout: the weights in a data file (a cached single-file program is rebuilt)
        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                "onnxscript": onnxscript.__version__, "layout": "external-data"}

    @classmethod
    def compile(cls, module, inputs, path: Path, quantize: str = "none") -> None:
        import onnx
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=True,
                          input_names=list(inputs), optimize=True,
                          verbose=False, external_data=False)
        # The weights move to a data file beside the graph: ONNX Runtime then reads them
        # straight into its initializers, where a graph holding them keeps the protobuf's copy
        # alive beside them while the session loads (peak 1166 -> 829 MB for the default
        # model: benchmarks/results/engine_memory.md). The file is named by its digest, which
        # `load` checks (the cache's record covers the graph only).
        model = onnx.load(str(path))
        if quantize != "none":
            model = quantize_base(model, quantize, getattr(module, "first", 0))
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
        if not data.exists():  # no initializer large enough to move
            return
        final = data.with_name(file_digest(data)[:32] + DATA_SUFFIX)
        os.replace(data, final)
        for t in _external(model):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = final.name
        onnx.save_model(model, str(path))

    @classmethod
    def load(cls, path: Path, threads: int):
        import onnx
        import onnxruntime as ort
        graph = onnx.load(str(path), load_external_data=False)
        for name in {e.value for t in _external(graph) for e in t.external_data
                     if e.key == "location"}:
            data = path.parent / name
            if not name.endswith(DATA_SUFFIX) or not data.is_file() or \
                    file_digest(data)[:32] != name[:-len(DATA_SUFFIX)]:
                raise ValueError(f"{data}: the program's weights are missing or corrupt")
        del graph
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Memory, at the same speed (benchmarks/results/engine_memory_W5.md, prge q=4 program
        # alone: 1199 -> 1001 MB): no planned memory pattern (one block sized for every
        # intermediate of the call), and no constant folding, which would fold the streamed
        # head's slices of the embedding table into a second, transposed copy of it
        opts.enable_mem_pattern = False
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["ConstantFolding"])
        # an input the graph does not read (k2 under rademacher noise) may be pruned
        return sess, [i.name for i in sess.get_inputs()]

    @classmethod
    def run(cls, runner, inputs) -> list[torch.Tensor]:
        sess, names = runner
        return [torch.from_numpy(o) for o in sess.run(None, {n: inputs[n].numpy() for n in names})]
