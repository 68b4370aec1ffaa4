"""onnxruntime: the step's forward passes as one ONNX program (`program.StepProgram`: LoRA
replicas as inputs, noise generated inside, pocketllm's loss), exported with
`torch.onnx.export(dynamo=True)` and run by an ONNX Runtime `InferenceSession` with the run's
thread count. The pip extra `pocketllm[onnx]` installs the runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import register
from .program import ProgramEngine

NAMES = ["input_ids", "attention_mask", "pos", "targets", "cands", "weight", "train", "fixed",
         "k1", "k2", "scale"]


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

    def compile(self, program, inputs, path: Path) -> None:
        # dynamo=True writes to a name of its own choosing when the weights overflow 2 GB
        # (external data); a pocketllm model stays under it
        torch.onnx.export(program, tuple(inputs), str(path), dynamo=True, input_names=NAMES,
                          output_names=["losses"], optimize=True, verbose=False,
                          external_data=False)

    def load(self, path: Path):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        # an input the graph does not read (k2 under rademacher noise) may be pruned
        return sess, [i.name for i in sess.get_inputs()]

    def run(self, runner, inputs) -> torch.Tensor:
        sess, names = runner
        feed = dict(zip(NAMES, inputs))
        return torch.from_numpy(sess.run(None, {n: feed[n].numpy() for n in names})[0])
