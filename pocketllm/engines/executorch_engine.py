"""executorch: the step's forward passes as one ExecuTorch program (`program.StepProgram`:
LoRA replicas as inputs, noise generated inside, pocketllm's loss): `torch.export` ->
`to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])` (the matmuls, the replicas'
batched LoRA products, the elementwise float ops on XNNPACK) -> `to_executorch()`, run by
`executorch.runtime.Runtime`; the integer noise ops and the loss's gathers run on the portable
kernels. The pip extra `pocketllm[executorch]` installs the runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import register
from .program import ProgramEngine, shift_div


@register("executorch")
class ExecuTorchEngine(ProgramEngine):
    extra = "executorch"
    suffix = ".pte"
    shr = staticmethod(shift_div)
    modules = ("executorch.runtime", "executorch.exir",
               "executorch.backends.xnnpack.partition.xnnpack_partitioner")

    @staticmethod
    def versions() -> dict[str, str]:
        from importlib.metadata import version
        return {"executorch": version("executorch")}

    def compile(self, program, inputs, path: Path) -> None:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        exported = torch.export.export(program, tuple(inputs), strict=False)
        lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        path.write_bytes(lowered.to_executorch().buffer)

    def load(self, path: Path):
        from executorch.runtime import Runtime
        return Runtime.get().load_program(str(path)).load_method("forward")

    def run(self, runner, inputs) -> torch.Tensor:
        return runner.execute(inputs)[0]
