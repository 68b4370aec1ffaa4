"""A host for the program that trains itself (`pocketllm export --trainable RUN.yaml --format
onnx --out BUNDLE`): ONNX Runtime and numpy only -- no pocketllm, no torch in this process
(it asserts so at the end). The program is a pure function, so the host holds the state.

    python examples/host/train_onnx.py BUNDLE RUN_DIR [--steps N] [--threads T]
    pocketllm replay --adapter-path RUN_DIR --save-path ADAPTER     (the same adapter, in torch)

What every host does (keys, log, state, host.json): host.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402  (beside this file)


class OnnxRunner(host.Runner):
    def __init__(self, bundle: Path, manifest: dict, threads: int):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # as pocketllm's engine loads its programs (less memory, the same speed): no planned
        # memory pattern, no constant folding (it would copy the head's slices of the table)
        opts.enable_mem_pattern = False
        self.sess = ort.InferenceSession(str(bundle / manifest["program"]), opts,
                                         providers=["CPUExecutionProvider"],
                                         disabled_optimizers=["ConstantFolding"])
        self.names = [i.name for i in self.sess.get_inputs()]  # unread inputs are pruned
        state = np.load(bundle / "state.npz")
        self.train, self.fixed = state["train"], state["fixed"]

    def step(self, batch, k1, k2, lr, eps):
        feed = dict(batch, train=self.train, fixed=self.fixed, k1=k1, k2=k2, lr=lr, eps=eps)
        self.train, losses, g = self.sess.run(None, {n: feed[n] for n in self.names})
        return losses, g  # (a non-finite step hands back the state it was given)

    def state(self):
        return self.train


def main(argv=None) -> int:
    a = host.parse(argv, __doc__)
    manifest = host.load_bundle(a.bundle)
    rc = host.train(a, manifest, OnnxRunner(a.bundle, manifest, a.threads))
    assert "torch" not in sys.modules, "the host imported torch"
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
