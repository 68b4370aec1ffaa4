"""A program that trains itself: the whole zeroth-order step (the perturbed forwards, the
estimate, the update) as one exported program, run by a host that is not pocketllm's training
loop (`pocketllm export --trainable RUN.yaml --format onnx`; `examples/host/train_onnx.py`).

    new_train, losses, projected_grads = step(input_ids, attention_mask, pos, targets, cands,
                                              weight,      the batch, as a StepProgram takes it
                                              train,       the trained LoRA tensors, flat
                                              fixed,       the LoRA tensors it reads only
                                              k1, k2,      the step's keys (q, n): low, high word
                                              lr, eps)     float64 (1,)

Inside: `StepProgram`'s W replicas (the estimator's: fzoo's unperturbed one and q one-sided,
or spsa's q +/- pairs), the estimator's `traced` projected gradients in float64, then the sgd
update w += f32(-lr * g_j / q) * z_j for j = 0..q-1, in that order, in float32 -- the very
operations `pocketllm replay` applies (`zo.noise.add_noise_` per key), so the host's log of
(seed, projected gradients, lr) replays in torch to the program's state: bit for bit under
Rademacher z (prge's default), to ~1e-6 under Gaussian (float32 log/cos in the program).

The host passes only integers and the batch: the keys are `zo.log.KeySpace(seed).keys`
(splitmix64 on Python ints, which the host computes itself). Batches are a pure function of the
step (`data.Batcher`), so the export writes the first `--steps` of them, padded to one shape,
with the initial state, the per-step lr and eps, and the ZO log's header (manifest.json), and
the run's config.yaml that `pocketllm replay` reads.

A format is one entry of `WRITERS`: onnx, the pure function (the host holds the state); pte,
one ExecuTorch program whose methods `step`, `eval`, `get_state`, `set_state` share the state
as a mutable buffer (`examples/host/train_pte.py`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .engines.program import (INPUTS, MIN_SEQ, Shapes, StepProgram, bucket, fixed_lora,
                              flat_state, program_inputs, program_noise, scored, stores_tables)

FORMAT = "pocketllm-selftrain/1"
STEP_INPUTS = (*INPUTS[:8], "k1", "k2", "lr", "eps")
STEP_OUTPUTS = ("new_train", "losses", "projected_grads")
KEY_SCHEME = ("keys[j][i] = derive_key(seed, step, j * tensors + i) (pocketllm.zo.noise: "
              "splitmix64(splitmix64(splitmix64(seed) ^ step) ^ index) mod 2**64); "
              "k1 = key & 0xFFFFFFFF, k2 = key >> 32")


class TrainStep(nn.Module):
    """One zeroth-order step of `estimator` with sgd on the LoRA tensors, as a pure function
    (see the module's docstring). `program` is the forward (`StepProgram`, W = the estimator's
    replicas)."""

    def __init__(self, program: StepProgram, replicas, estimator):
        super().__init__()
        self.program, self.estimator, self.q = program, estimator, estimator.queries
        self.first = program.first  # (a quantizer rounds activations below it only)
        # replica r reads key row rep_query[r] of [k; 0] (row q: the unperturbed replica's)
        self.register_buffer("rep_query", torch.tensor(
            [r.query if r.query >= 0 else self.q for r in replicas]), persistent=False)
        self.register_buffer("rep_sign", torch.tensor([r.sign for r in replicas],
                                                      dtype=torch.float64), persistent=False)

    def losses(self, input_ids, attention_mask, pos, targets, cands, weight, train, fixed,
               k1, k2, eps):
        """The W replicas' losses (float32) at `train` perturbed along the step's keys."""
        zero = torch.zeros_like(k1[:1])
        rk1, rk2 = torch.cat([k1, zero])[self.rep_query], torch.cat([k2, zero])[self.rep_query]
        scale = (self.rep_sign * eps).to(torch.float32)  # f32(sign * eps), as the engines
        return self.program(input_ids, attention_mask, pos, targets, cands, weight, train,
                            fixed, rk1, rk2, scale)

    def update(self, train, k1, k2, g, lr):
        """train after the sgd update: + f32(-lr * g_j / q) * z_j, one query after another."""
        p = self.program
        z = program_noise(k1, k2, p.tensor_id, p.index, p.dist, p.shr)       # (q, P)
        coef = (-lr * g / self.q).to(torch.float32)  # Estimate.coefs, rounded as add_noise_
        for j in range(self.q):
            train = train + z[j] * coef[j]
        return train

    def forward(self, input_ids, attention_mask, pos, targets, cands, weight, train, fixed,
                k1, k2, lr, eps):
        losses = self.losses(input_ids, attention_mask, pos, targets, cands, weight, train,
                             fixed, k1, k2, eps)
        g = self.estimator.traced(losses.to(torch.float64), eps)
        new = self.update(train, k1, k2, g, lr)
        # a non-finite loss, estimate or weight leaves the state as it was (the host stops
        # and logs nothing): the program never holds, nor hands out, a non-finite state
        ok = torch.isfinite(losses).all() & torch.isfinite(g).all() & torch.isfinite(new).all()
        return torch.where(ok, new, train), losses, g


# ----------------------------------------------------------------------------- the bundle

def key_words(keys: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(k1, k2) int64 (q, n): the keys' low and high 32-bit words."""
    return (torch.tensor([[k & 0xFFFFFFFF for k in ks] for ks in keys], dtype=torch.int64),
            torch.tensor([[k >> 32 for k in ks] for ks in keys], dtype=torch.int64))


def _run_settings(path: str):
    """The training run a YAML describes (as `pocketllm train -c` reads it): its TrainArgs and
    its method's Config, resolved with the method's defaults."""
    from .config import SettingError, TrainArgs, check, load_yaml
    from .methods import get_method, setting_classes, settings_for
    from .methods.zo import ZOMethod
    try:
        values = load_yaml(path, TrainArgs, *setting_classes())
    except SettingError as e:
        raise SystemExit(f"error: --trainable {e}") from None
    own = {f.name for f in dataclasses.fields(TrainArgs)}
    args = TrainArgs(**{k: v for k, v in values.items() if k in own})
    check(args)
    method_cls = get_method(args.method)
    if not issubclass(method_cls, ZOMethod):
        raise SystemExit(f"error: --trainable {path}: method {args.method} is not zeroth-order; "
                         "a program that trains itself runs zo-sgd or prge")
    cfg = method_cls.resolve(args, settings_for(args.method, {k: v for k, v in values.items()
                                                              if k not in own}))
    check(cfg)
    method_cls.prepare(args, cfg)
    if args.grad_accumulation != 1:
        raise SystemExit(f"error: --trainable {path}: grad-accumulation {args.grad_accumulation}"
                         ": the program takes one batch a step (use 1)")
    return args, cfg, method_cls


def build(config: str, steps: int, engine_cls):
    """Everything a host needs, in memory: (TrainStep, the example inputs (step 0), manifest,
    batches {name: (steps, ...) array}, state {train, fixed}, config dict)."""
    from .data import Batcher
    from .data.source import load_run_data
    from .loss import is_masked_lm
    from .models import load_model
    from .schedules import eps_at, lr_at
    from .zo.estimators.base import Estimator
    args, cfg, method_cls = _run_settings(config)
    steps = steps or args.iters
    data = load_run_data(args)
    where = f"export --trainable {config}"
    try:  # a quantized base is the program's own (float model in, quantized program out)
        scheme = engine_cls.load_scheme(args.quantize_base)
    except ValueError as e:
        raise SystemExit(f"error: {where}: {e}") from None
    model, tok = load_model(args.model, args.dtype, scheme)
    enc = data.encode(tok, is_masked_lm(model), args.max_seq_length, args.mask_prompt)
    objective = data.objective(tok)
    spec, params = method_cls.trainable(model, args)
    cfg.engine = "torch"  # the method's own engine is not used: the program is the engine
    method = method_cls(model, params, cfg, args, objective)
    try:
        engine_cls.check(model, params, objective.stats, method.perturbation, where,
                         instead="train it with pocketllm train")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    est = method.estimator
    if type(est).traced is Estimator.traced or est.anchor_every:
        raise SystemExit(f"error: {where}: estimator {est.name} has no traced form "
                         "(fzoo and spsa do)")
    if method.opt.name != "sgd":
        raise SystemExit(f"error: {where}: zo-optimizer {method.opt.name}: the program "
                         "applies sgd (its update is the seeded one the log replays)")
    batcher = Batcher(enc["train"].items, args.batch_size, args.seed, tok.pad_token_id, 1,
                      objective.collate)
    batches = [batcher(t, 0) for t in range(steps)]
    rows = objective.name == "classification"
    t = max(b["input_ids"].shape[1] for b in batches)
    limit = getattr(model.config, "max_position_embeddings", 1 << 30)
    shapes = Shapes(W=len(method.replicas), B=bucket(max(b["input_ids"].shape[0]
                                                         for b in batches)),
                    T=min(bucket(t, MIN_SEQ), max(t, limit)),
                    N=bucket(max(scored(b, rows) for b in batches)),
                    C=batches[0]["label_ids"].shape[1] if rows else 0)
    pad = getattr(model.config, "pad_token_id", None) or 0
    per_step = [program_inputs(b, rows, shapes, pad) for b in batches]
    arrays = {n: torch.stack([s[i] for s in per_step]).numpy() for i, n in enumerate(INPUTS[:6])}
    trained = [n for n, _ in params]
    train, fixed = flat_state([p for _, p in params], fixed_lora(model, trained))
    k1, k2 = key_words(method.keys(0))
    f64 = dict(dtype=torch.float64)
    example = dict(zip(STEP_INPUTS, [*per_step[0], train, fixed, k1, k2,
                                     torch.tensor([lr_at(args, 0)], **f64),
                                     torch.tensor([eps_at(cfg, 0, args.iters)], **f64)]))
    program = StepProgram(model, trained, method.perturbation.dist, shapes, engine_cls.shr,
                          stores_tables(args.quantize_base))
    step = TrainStep(program, method.replicas, est).eval()
    header = method.header()
    manifest = {
        "format": FORMAT, "model": args.model, "quantize_base": args.quantize_base,
        "steps": steps,
        "shapes": dataclasses.asdict(shapes),
        "inputs": [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix(
            "torch.")} for n, v in example.items()],
        "outputs": list(STEP_OUTPUTS),
        "estimator": est.name, "queries": est.queries, "optimizer": "sgd",
        "dist": method.perturbation.dist,
        "lr": [lr_at(args, s) for s in range(steps)],
        "eps": [eps_at(cfg, s, args.iters) for s in range(steps)],
        "keys": {"scheme": KEY_SCHEME, "seed": header["seed"], "queries": est.queries,
                 "tensors": len(params)},
        "label_ids": batches[0]["label_ids"][0].tolist() if rows else None,
        "state": {"train": int(train.numel()), "fixed": int(fixed.numel()),
                  "tensors": [[n, list(p.shape)] for n, p in params]},
        "log_header": header,
    }
    settings = {**dataclasses.asdict(args), **dataclasses.asdict(cfg)}
    return step, example, manifest, arrays, {"train": train.numpy(), "fixed": fixed.numpy()}, \
        settings


def _write_onnx(step: TrainStep, example: dict, out: Path, quantize: str) -> str:
    from .engines.onnxruntime_engine import OnnxRuntimeEngine
    OnnxRuntimeEngine.compile(step, example, out / "step.onnx", quantize)
    return "step.onnx"


# ---- ExecuTorch: the state inside the program --------------------------------------------

class State(nn.Module):
    """What a stateful program holds between calls: the trained LoRA tensors (`lora`, a
    mutable buffer, shared by its methods) and the fixed ones (a constant); `step`: the
    TrainStep (its StepProgram, at one unperturbed replica, is `eval`'s forward)."""

    def __init__(self, step: TrainStep, train, fixed):
        super().__init__()
        self.step = step
        self.register_buffer("lora", train.clone())
        self.register_buffer("fixed", fixed.clone())


class StepMethod(nn.Module):
    """`step(batch, k1, k2, lr, eps) -> (losses, projected_grads)`; the state moves."""

    def __init__(self, state: State):
        super().__init__()
        self.state = state

    def forward(self, input_ids, attention_mask, pos, targets, cands, weight, k1, k2, lr, eps):
        s = self.state
        new, losses, g = s.step(input_ids, attention_mask, pos, targets, cands, weight,
                                s.lora, s.fixed, k1, k2, lr, eps)
        s.lora.copy_(new)
        return losses, g


class EvalMethod(nn.Module):
    """`eval(batch) -> loss (1,)` at the current state."""

    def __init__(self, state: State):
        super().__init__()
        self.state = state
        n = len(state.step.program.slices)
        self.register_buffer("zero_keys", torch.zeros(1, n, dtype=torch.int64), persistent=False)
        self.register_buffer("zero_scale", torch.zeros(1), persistent=False)

    def forward(self, input_ids, attention_mask, pos, targets, cands, weight):
        s = self.state
        return s.step.program(input_ids, attention_mask, pos, targets, cands, weight, s.lora, s.fixed,
                       self.zero_keys, self.zero_keys, self.zero_scale)


class GetState(nn.Module):
    """`get_state() -> train`, a copy."""

    def __init__(self, state: State):
        super().__init__()
        self.state = state

    def forward(self):
        return self.state.lora.clone()


class SetState(nn.Module):
    """`set_state(train) -> train`: the state replaced (a saved adapter, a rollback)."""

    def __init__(self, state: State):
        super().__init__()
        self.state = state

    def forward(self, train):
        self.state.lora.copy_(train)
        return self.state.lora.clone()


METHODS = {"step": StepMethod, "eval": EvalMethod, "get_state": GetState,
           "set_state": SetState}


def _write_pte(step: TrainStep, example: dict, out: Path, quantize: str) -> str:
    """One ExecuTorch program, the methods of `METHODS` over one shared, initialised state
    (a float base: `export_trainable` refuses a quantized one)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    state = State(step, example["train"], example["fixed"])
    batch = tuple(example[n] for n in INPUTS[:6])
    args = {"step": (*batch, *(example[n] for n in ("k1", "k2", "lr", "eps"))),
            "eval": batch, "get_state": (), "set_state": (example["train"],)}
    programs = {name: torch.export.export(cls(state), args[name], strict=False)
                for name, cls in METHODS.items()}
    lowered = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    # Two traps, each silently wrong: a mutable buffer starts at zero unless named to this
    # pass (by its placeholder's name, b_state_lora); and each method keeps its own copy of
    # the state unless memory planning shares it (by the names the emitter writes)
    config = ExecutorchBackendConfig(
        passes=[InitializedMutableBufferPass(["state_lora"])],
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
        emit_mutable_buffer_names=True)
    (out / "step.pte").write_bytes(lowered.to_executorch(config).buffer)
    return "step.pte"


# format -> (the engine whose program it is, writer(step, example, out dir) -> file name)
WRITERS = {"onnx": ("onnxruntime", _write_onnx), "pte": ("executorch", _write_pte)}


def export_trainable(args) -> Path:
    """`pocketllm export --trainable RUN.yaml --format F --out DIR`: the step program, its
    manifest, batches, initial state and the run's config.yaml in DIR; returns DIR."""
    from . import engines
    from .config import save_yaml
    if args.format not in WRITERS:
        raise SystemExit(f"error: --trainable writes {' or '.join(WRITERS)}, not --format "
                         f"{args.format}")
    from .config import ModelArgs, field_defaults
    moved = [k for k, v in field_defaults(ModelArgs).items() if getattr(args, k) != v]
    if moved or args.adapter_path:
        raise SystemExit(f"error: --trainable {args.trainable} holds the run's settings: set "
                         f"{', '.join(moved) or 'the initial adapter (seed)'} there, not as "
                         "export flags")
    engine, write = WRITERS[args.format]
    quant = _run_settings(args.trainable)[0].quantize_base
    if args.format == "pte" and quant != "none":  # (before the model loads)
        raise SystemExit(f"error: --format pte --trainable: the self-training .pte runs a float "
                         f"base, not quantize-base {quant} (--format onnx builds "
                         f"{' / '.join(engines.REGISTRY['onnxruntime'].schemes)} into its "
                         "program)")
    out = Path(args.out or "selftrain")
    out.mkdir(parents=True, exist_ok=True)
    step, example, manifest, arrays, state, settings = build(
        args.trainable, args.steps, engines.REGISTRY[engine])
    t0 = time.time()
    with torch.no_grad():
        manifest["program"] = write(step, example, out, manifest["quantize_base"])
    manifest["export_seconds"] = round(time.time() - t0, 1)
    from .engines.onnxruntime_engine import DATA_SUFFIX  # (an ONNX graph's weights file)
    manifest["program_bytes"] = sum(f.stat().st_size for f in (
        out / manifest["program"], *out.glob("*" + DATA_SUFFIX)))
    np.savez(out / "batches.npz", **arrays)
    np.savez(out / "state.npz", **state)
    save_yaml(settings, out / "config.yaml")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
