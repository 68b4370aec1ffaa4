"""A host for the stateful program that trains itself (`pocketllm export --trainable RUN.yaml
--format pte --out BUNDLE`), run by ExecuTorch's Python runtime: the LoRA state lives inside
the program (a mutable buffer its methods `step`, `eval`, `get_state`, `set_state` share).

    python examples/host/train_pte.py BUNDLE RUN_DIR [--steps N] [--threads T]

No pocketllm here. torch IS imported, and not by choice: executorch 1.5.1's Python binding
links libtorch, runs `import torch` and takes only torch tensors, so this host wraps its numpy
arrays with `torch.from_numpy` and does nothing else with torch. A phone host is C++ over the
ExecuTorch `Module` API, which calls the same methods (docs/engines.md).

What every host does (keys, log, state, host.json): host.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402  (beside this file)


class PteRunner(host.Runner):
    def __init__(self, bundle: Path, manifest: dict, threads: int):
        import torch  # only to hand arrays to the binding (see the docstring)
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
        if threads and portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.wrap = torch.from_numpy
        program = Runtime.get().load_program(str(bundle / manifest["program"]))
        self.methods = {m: program.load_method(m) for m in ("step", "eval", "get_state",
                                                           "set_state")}

    def call(self, method: str, *arrays) -> list[np.ndarray]:
        out = self.methods[method].execute([self.wrap(np.ascontiguousarray(x)) for x in arrays])
        return [o.numpy() for o in out]

    def step(self, batch, k1, k2, lr, eps):
        losses, g = self.call("step", *batch.values(), k1, k2, lr, eps)
        return losses, g

    def state(self):
        return self.call("get_state")[0]


def main(argv=None) -> int:
    a = host.parse(argv, __doc__)
    manifest = host.load_bundle(a.bundle)
    return host.train(a, manifest, PteRunner(a.bundle, manifest, a.threads))


if __name__ == "__main__":
    raise SystemExit(main())
