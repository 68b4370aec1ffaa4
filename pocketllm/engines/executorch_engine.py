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
    modules = ("executorch.runtime", "executorch.exir",
               "executorch.backends.xnnpack.partition.xnnpack_partitioner")
    shr = staticmethod(shift_div)

    @staticmethod
    def versions() -> dict[str, str]:
        from importlib.metadata import version
        return {"executorch": version("executorch")}

    @classmethod
    def compile(cls, module, inputs, path: Path, quantize: str = "none") -> None:
        if quantize != "none":  # (`schemes` is empty: refused before the model loads)
            raise ValueError(f"--engine executorch exports a float base, not {quantize}")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        exported = torch.export.export(module, tuple(inputs.values()), strict=False)
        lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        path.write_bytes(lowered.to_executorch().buffer)

    @classmethod
    def load(cls, path: Path, threads: int):
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
        # the runtime's threadpool (XNNPACK's) is one per process, sized to the cores: the run's
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        return Runtime.get().load_program(str(path)).load_method("forward")

    @classmethod
    def run(cls, runner, inputs) -> list[torch.Tensor]:
        return list(runner.execute(list(inputs.values())))
