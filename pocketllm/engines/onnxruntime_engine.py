"""onnxruntime: the step's forward passes as one ONNX program (`program.StepProgram`: LoRA
replicas as inputs, noise generated inside, pocketllm's loss), exported with
`torch.onnx.export(dynamo=True)` and run by an ONNX Runtime `InferenceSession` with the run's
thread count. The pip extra `pocketllm[onnx]` installs the runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import register
from .program import ProgramEngine


@register("onnxruntime")
class OnnxRuntimeEngine(ProgramEngine):
    extra = "onnx"
    suffix = ".onnx"
    modules = ("onnxruntime", "onnx", "onnxscript")

    @staticmethod
    def versions() -> dict[str, str]:
        import onnx
        import onnxruntime
        import onnxscript
        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                "onnxscript": onnxscript.__version__}

    @classmethod
    def compile(cls, module, inputs, path: Path) -> None:
        # one file: a pocketllm model's float32 weights stay under protobuf's 2 GB
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=True,
                          input_names=list(inputs), optimize=True,
                          verbose=False, external_data=False)

    @classmethod
    def load(cls, path: Path, threads: int):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        # an input the graph does not read (k2 under rademacher noise) may be pruned
        return sess, [i.name for i in sess.get_inputs()]

    @classmethod
    def run(cls, runner, inputs) -> list[torch.Tensor]:
        sess, names = runner
        return [torch.from_numpy(o) for o in sess.run(None, {n: inputs[n].numpy() for n in names})]
