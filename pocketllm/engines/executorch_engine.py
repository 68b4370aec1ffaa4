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
from .program import ProgramEngine, below, shift_div


def quantize_base(exported, inputs: dict[str, torch.Tensor], scheme: str,
                  first: int = 0):
    """`exported` (a torch.export program) with its frozen base Linears, the linears whose
    weight is a constant of the program, quantized for XNNPACK: int8 weights, one scale per
    output channel, and activations quantized to int8 per row at run time (XNNPACK's qd8-f32-
    qc8w kernels; `int8-dynamic`, as the torch scheme), through torch.export's pt2e flow with
    ExecuTorch's XNNPACKQuantizer. The LoRA products (weights are program inputs), the noise's
    integer ops and the head stay as they were, and so do the linears of layer `first` (the
    first with a trained tensor) and above. Returns the re-exported program."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    if scheme != "int8-dynamic":
        raise ValueError(f"--engine executorch builds int8-dynamic, not {scheme}")
    linear = torch.ops.aten.linear.default
    q = XNNPACKQuantizer().set_operator_type(
        linear, get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    # only below the first trained layer, where every replica's activations are the same:
    # above it rounding them would swamp the finite differences (`program.below`); those
    # linears stay float (XNNPACK has no int8-weight linear with float activations)
    q.set_filter_function(lambda n: n.target == linear and n.args[1].op == "get_attr"
                          and below(str(n.args[1].target), first))
    # its default transform turns scalar operands into float tensors (for quantized add/mul),
    # which breaks the noise's integer ops (bitwise_and on a float): only linears are wanted
    q.transform_for_annotation = lambda gm: gm
    gm = prepare_pt2e(exported.module(), q)
    with torch.no_grad():
        gm(*inputs.values())  # (dynamic: observes the weights only)
    gm = convert_pt2e(gm)
    return torch.export.export(gm, tuple(inputs.values()), strict=False)


@register("executorch")
class ExecuTorchEngine(ProgramEngine):
    extra = "executorch"
    suffix = ".pte"
    modules = ("executorch.runtime", "executorch.exir",
               "executorch.backends.xnnpack.partition.xnnpack_partitioner")
    shr = staticmethod(shift_div)
    schemes = ("int8-dynamic",)  # `quantize_base`

    @staticmethod
    def versions() -> dict[str, str]:
        from importlib.metadata import version
        return {"executorch": version("executorch")}

    @classmethod
    def compile(cls, module, inputs, path: Path, quantize: str = "none") -> None:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        exported = torch.export.export(module, tuple(inputs.values()), strict=False)
        if quantize != "none":
            exported = quantize_base(exported, inputs, quantize,
                                     getattr(module, "first", 0))
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
