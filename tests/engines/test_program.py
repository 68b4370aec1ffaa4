"""The exported step program (pocketllm/engines/program.py): its noise is zo/noise.py's, bit for
bit, in every runtime; its programs are cached and a corrupt entry is rebuilt; an engine without
its runtime says which extra to install; a run trains through it as through torch."""

from __future__ import annotations

import json

import pytest
import torch

from pocketllm.engines import REGISTRY
from pocketllm.engines.program import (ProgramCache, StepProgram, program_hash, program_noise,
                                       shift_div, shift_op)
from pocketllm.zo import noise
from tests.engines.test_conformance import EPS, REPLICAS, Reference, _keys, _setup
from pocketllm.zo.plan import Plan, group_passes

PROGRAM_ENGINES = sorted(n for n, c in REGISTRY.items() if hasattr(c, "compile"))
SIZES = [37, 1000, 3]  # three tensors' element counts


def _key_words(keys):
    k1 = torch.tensor([[k & 0xFFFFFFFF for k in ks] for ks in keys])
    k2 = torch.tensor([[k >> 32 for k in ks] for ks in keys])
    return k1, k2


def _layout():
    tid = torch.cat([torch.full((n,), i) for i, n in enumerate(SIZES)])
    idx = torch.cat([torch.arange(n) for n in SIZES])
    return tid, idx


class Noise(torch.nn.Module):
    """Both words' hashes and both distributions' z, as a program computes them."""

    def __init__(self, shr):
        super().__init__()
        self.shr = shr

    def forward(self, k1, k2, tid, idx):
        return (program_noise(k1, k2, tid, idx, "rademacher", self.shr),
                program_noise(k1, k2, tid, idx, "gaussian", self.shr),
                program_hash(k1, tid, idx, self.shr), program_hash(k2, tid, idx, self.shr))


def _check(rad, gauss, h1, h2):
    assert torch.equal(h1, _reference_hash(KEYS, 0)) and torch.equal(h2, _reference_hash(KEYS, 1))
    assert torch.equal(rad, _reference(KEYS, "rademacher"))
    assert torch.allclose(gauss, _reference(KEYS, "gaussian"), rtol=0, atol=1e-5)


def _reference(keys, dist):
    return torch.stack([torch.cat([noise.reference.noise(k, 0, n, dist)
                                   for k, n in zip(ks, SIZES)]) for ks in keys])


def _reference_hash(keys, word):
    return torch.stack([torch.cat([noise.reference.hash32(
        (k & 0xFFFFFFFF) if word == 0 else k >> 32, torch.arange(n)) for k, n in zip(ks, SIZES)])
        for ks in keys])


KEYS = [_keys(q, len(SIZES)) for q in range(2)]


@pytest.mark.parametrize("shr", [shift_op, shift_div])
def test_the_program_noise_is_zo_noise(shr):
    """Eager: every hash bit and every rademacher sign equal zo/noise.py's reference; gaussian
    z (float32 log/cos against the reference's float64) within 1e-5."""
    k1, k2 = _key_words(KEYS)
    tid, idx = _layout()
    _check(*Noise(shr)(k1, k2, tid, idx))


@pytest.mark.parametrize("engine_name", PROGRAM_ENGINES)
def test_the_noise_is_bit_identical_in_every_runtime(engine_name, tmp_path):
    cls = REGISTRY[engine_name]
    for mod in cls.modules:
        pytest.importorskip(mod)
    k1, k2 = _key_words(KEYS)
    tid, idx = _layout()
    inputs = {"k1": k1, "k2": k2, "tid": tid, "idx": idx}
    path = tmp_path / f"noise{cls.suffix}"
    cls.compile(Noise(cls.shr), inputs, path)
    runner = cls.load(path, 1)
    _check(*cls.run(runner, inputs))


def test_a_corrupt_or_stale_cache_entry_is_rebuilt(tmp_path):
    cache = ProgramCache(tmp_path)
    built = []

    def build(path):
        built.append(path)
        path.write_bytes(b"program %d" % len(built))

    key = {"model": "m", "shapes": (1, 2)}  # a tuple: the record holds a list
    path, took = cache.get(key, ".bin", build)
    assert len(built) == 1 and path.read_bytes() == b"program 1" and took > 0
    assert cache.get(key, ".bin", build) == (path, 0.0) and len(built) == 1  # cached
    path.write_bytes(b"program 1 but truncat")                                # corrupt
    assert cache.get(key, ".bin", build)[0].read_bytes() == b"program 2"
    record = path.with_suffix(".json")
    record.write_text("{not json")                                            # a torn record
    assert cache.get(key, ".bin", build)[0].read_bytes() == b"program 3"
    meta = json.loads(record.read_text())
    meta["key"]["shapes"] = [9]                                               # another key
    record.write_text(json.dumps(meta))
    assert cache.get(key, ".bin", build)[0].read_bytes() == b"program 4"
    path.unlink()                                                             # gone
    assert cache.get(key, ".bin", build)[0].read_bytes() == b"program 5"
    assert not list(tmp_path.glob("*.tmp"))


def _engine(name, cache_dir, trainable="lora", objective="classification", lora_fa=False):
    cls = REGISTRY[name]
    for mod in cls.modules:
        pytest.importorskip(mod)
    model, params, obj, batch = _setup("tiny-llama", trainable, objective)
    if lora_fa:  # LoRA-FA: A frozen (a program input, not perturbed), B trained
        params = [(n, p) for n, p in params if n.endswith(".lora_B")]
    return model, params, obj, batch, cls(model, params, obj.stats, dist="rademacher",
                                          program_cache=str(cache_dir))


def test_an_engine_program_corrupted_on_disk_is_rebuilt_and_right(tmp_path):
    name = "onnxruntime"
    model, params, obj, batch, engine = _engine(name, tmp_path)
    plan = Plan([_keys(j, len(params)) for j in range(3)], EPS, REPLICAS,
                group_passes(REPLICAS, "both"))
    first = engine.losses(batch, plan)
    assert engine.export_seconds > 0
    cached = REGISTRY[name](model, params, obj.stats, dist="rademacher",
                            program_cache=str(tmp_path))
    assert torch.equal(cached.losses(batch, plan), first)
    assert cached.export_seconds == 0  # loaded, not exported again
    (program,) = tmp_path.glob("*.onnx")
    program.write_bytes(program.read_bytes()[: program.stat().st_size // 2])
    again = REGISTRY[name](model, params, obj.stats, dist="rademacher",
                           program_cache=str(tmp_path))
    assert torch.equal(again.losses(batch, plan), first)
    assert again.export_seconds > 0  # rebuilt, not trusted
    # its weights, in a data file beside the graph (named by its digest): a flipped byte
    (data,) = tmp_path.glob("*.onnx.data")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    third = REGISTRY[name](model, params, obj.stats, dist="rademacher",
                           program_cache=str(tmp_path))
    assert torch.equal(third.losses(batch, plan), first)
    assert third.export_seconds > 0
    # a program exported by other code (pocketllm upgraded, program.py changed): stale
    cls = REGISTRY[name]
    assert cls.code_digest() == cls.code_digest()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "code_digest", classmethod(lambda c: "other code"))
        fourth = cls(model, params, obj.stats, dist="rademacher", program_cache=str(tmp_path))
        assert torch.equal(fourth.losses(batch, plan), first)
        assert fourth.export_seconds > 0


def test_lora_fa_perturbs_b_alone(tmp_path):
    model, params, obj, batch, engine = _engine("onnxruntime", tmp_path, lora_fa=True)
    keys = [_keys(j, len(params)) for j in range(3)]
    ref = Reference(model, params, obj, batch, "rademacher")
    got = engine.losses(batch, Plan(keys, EPS, REPLICAS, group_passes(REPLICAS, "both")))
    assert got.tolist() == pytest.approx(ref.losses(keys), rel=1e-4)


@pytest.mark.parametrize("engine_name", PROGRAM_ENGINES)
def test_without_its_runtime_an_engine_names_the_extra(engine_name, monkeypatch):
    cls = REGISTRY[engine_name]
    monkeypatch.setattr(cls, "modules", ("pocketllm_no_such_runtime",))
    model, params, obj, _ = _setup("tiny-llama", "lora", "classification")
    with pytest.raises(SystemExit, match=rf"pip install pocketllm\[{cls.extra}\]"):
        cls(model, params, obj.stats)


def test_a_program_is_the_model():
    """The eager program equals the model's own forward at every replica (the export only
    changes the runtime): checked here without exporting, on a language-modelling batch whose
    rows are padded to a bucket."""
    model, params, obj, batch = _setup("tiny-llama", "lora", "lm")
    from pocketllm.engines.program import Shapes, bucket, program_inputs, scored, INPUTS
    n = len(params)
    keys = [_keys(j, n) for j in range(3)]
    ref = Reference(model, params, obj, batch, "gaussian")
    shapes = Shapes(W=8, B=bucket(batch["input_ids"].shape[0] + 1), T=64,
                    N=bucket(scored(batch, False)), C=0)
    prog = StepProgram(model, [m for m, _ in params], "gaussian", shapes)
    ks = [keys[r.query] if r.query >= 0 else [0] * n for r in REPLICAS] + [[0] * n] * 2
    k1, k2 = _key_words(ks)
    scale = torch.tensor([r.sign * EPS for r in REPLICAS] + [0.0, 0.0])
    train = torch.cat([p.data.reshape(-1) for _, p in params])
    inputs = program_inputs(batch, False, shapes) + [train, torch.zeros(1), k1, k2, scale]
    assert len(inputs) == len(INPUTS)
    with torch.no_grad():
        got = prog(*inputs)[:len(REPLICAS)].tolist()
    assert got == pytest.approx(ref.losses(keys), rel=1e-5)


@pytest.mark.parametrize("objective_name", ["classification", "lm"])
def test_a_program_runs_the_layers_below_the_adapter_once(objective_name, tmp_path):
    """With LoRA on the top layer only (`--lora-layers 1`), the program runs layer 0 on the
    batch once and repeats its output per replica (as `zo/shared.py` in torch); its losses
    are the explicitly perturbed model's, eager and through ONNX Runtime, whose cache keys
    the shared program apart from one that replicates every layer."""
    from tests.zo.test_shared import _setup as shared_setup
    from pocketllm.engines.program import Shapes, bucket, program_inputs, scored, INPUTS
    model, params, obj, batch = shared_setup("tiny-llama", objective_name, lora_layers="1")
    rows_kind = objective_name == "classification"
    n = len(params)
    keys = [_keys(j, n) for j in range(3)]
    ref = Reference(model, params, obj, batch, "rademacher").losses(keys)
    B = bucket(batch["input_ids"].shape[0])
    C = batch["label_ids"].shape[1] if rows_kind else 0
    shapes = Shapes(W=len(REPLICAS), B=B, T=64, N=bucket(scored(batch, rows_kind)), C=C)
    prog = StepProgram(model, [m for m, _ in params], "rademacher", shapes)
    assert prog.first == 1
    seen = []  # the rows each layer's attention runs on
    attention = prog._attention
    prog._attention = lambda x, *a: seen.append(x.shape[0]) or attention(x, *a)
    ks = [keys[r.query] if r.query >= 0 else [0] * n for r in REPLICAS]
    k1, k2 = _key_words(ks)
    scale = torch.tensor([r.sign * EPS for r in REPLICAS])
    train = torch.cat([p.data.reshape(-1) for _, p in params])
    inputs = program_inputs(batch, rows_kind, shapes) + [train, torch.zeros(1), k1, k2, scale]
    assert len(inputs) == len(INPUTS)
    with torch.no_grad():
        got = prog(*inputs).tolist()
    assert seen == [B, len(REPLICAS) * B]  # layer 0 once, layer 1 per replica
    assert got == pytest.approx(ref, rel=1e-5)

    pytest.importorskip("onnxruntime")
    engine = REGISTRY["onnxruntime"](model, params, obj.stats, dist="rademacher",
                                     program_cache=str(tmp_path))
    plan = Plan(keys, EPS, REPLICAS, group_passes(REPLICAS, "both"))
    assert engine.losses(batch, plan).tolist() == pytest.approx(ref, rel=1e-4)
    (entry,) = tmp_path.glob("*.json")
    assert json.loads(entry.read_text()).get("key", {}).get("shared") == 1


def test_a_run_with_an_engine_tracks_the_torch_run(tmp_path):
    """`pocketllm train --engine onnxruntime` (prge, 3 steps) logs the losses the torch run
    logs, within the engines' tolerance, and its log replays: the same seeds, the same z."""
    pytest.importorskip("onnxruntime")
    torch_losses = _step_losses(tmp_path, "torch", 3)
    assert _step_losses(tmp_path, "onnxruntime", 3) == pytest.approx(torch_losses, rel=1e-4)


def _step_losses(tmp_path, engine: str, iters: int, quantize: str = "none") -> list[float]:
    """The logged step losses of `pocketllm train` (prge, 2 queries) through `engine` on a
    base stored as `quantize` (one program cache for the test)."""
    from pocketllm.cli import main
    from tests.test_cli import FAST
    out = tmp_path / f"{engine}-{quantize}"
    assert main(["train", *FAST, "--iters", str(iters), "--steps-per-eval", "0",
                 "--no-eval-before", "--save-every", "0", "--method", "prge", "--queries", "2",
                 "--engine", engine, "--quantize-base", quantize,
                 "--program-cache", str(tmp_path / "programs"), "--adapter-path", str(out)]) == 0
    lines = (out / "zo_log.jsonl").read_text().splitlines()[1:]  # (after the header)
    return [json.loads(line)["loss"] for line in lines]


# ----------------------------------------------------------------------------- evaluation

def _eval_setup(objective_name):
    """A tiny model, its LoRA, encoded items of `objective_name` (language modelling with a
    closed label set: its choice accuracy is read from the program's hidden states), and the
    objective."""
    from pocketllm.models import load_model
    from pocketllm.objectives import LanguageModeling
    from tests.objectives._samples import SAMPLES
    model, params, obj, _ = _setup("tiny-llama", "lora", objective_name)
    _, tok = load_model("tiny-llama")
    items, _ = SAMPLES[objective_name](tok)
    if objective_name == "lm":  # (a byte-level tokenizer: the label words' first bytes)
        obj = LanguageModeling(choices=torch.tensor([32, 104, 109, 101]))
    return model, params, obj, items, tok.pad_token_id


@pytest.mark.parametrize("objective_name", ["classification", "lm"])
def test_the_eval_program_is_the_objective(objective_name):
    """Eager (no export): what an `EvalProgram` returns makes the objective's own per-row
    figures (loss, argmax, choice), the batch padded to its bucket."""
    from pocketllm.engines.program import EVAL_INPUTS, EvalProgram, INPUTS, Shapes, bucket, \
        program_inputs, scored
    model, params, obj, items, pad = _eval_setup(objective_name)
    batch = obj.collate(items, pad)
    rows_kind = objective_name == "classification"
    b, t = batch["input_ids"].shape
    C = batch["label_ids"].shape[1] if rows_kind else 0
    shapes = Shapes(W=1, B=bucket(b + 1), T=64, N=bucket(scored(batch, rows_kind)), C=C)
    prog = EvalProgram(model, [n for n, _ in params], "gaussian", shapes)
    inputs = program_inputs(batch, rows_kind, shapes)
    del inputs[INPUTS.index("weight")]
    train = torch.cat([p.data.reshape(-1) for _, p in params])
    with torch.no_grad():
        out = prog(*inputs, train, torch.zeros(1))
        ref = obj.stats(model, batch)
    assert len(EVAL_INPUTS) == len(inputs) + 2
    if rows_kind:
        from pocketllm.objectives.classification import class_result
        got = class_result(out[:b], batch["class_label"])
        assert torch.equal(got.pred, ref.pred)
    else:
        sel, tgt = obj._label_positions(batch)
        n = int(sel.sum())
        rows = torch.arange(b)[:, None].expand_as(tgt)[sel]
        w = model.get_output_embeddings().weight[obj.choices]
        got = obj.row_stats(b, rows, out[0][:n], (out[1][:n] == tgt[sel]).float(), out[2][:n],
                            tgt[sel], lambda h: h @ w.T)
        assert torch.equal(got.choice_correct, ref.choice_correct)
        assert torch.equal(got.tokens, ref.tokens)
    assert torch.allclose(got.nll, ref.nll, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.correct, ref.correct)


@pytest.mark.parametrize("objective_name", ["classification", "lm"])
def test_an_engine_evaluates_as_torch_holding_the_frozen_weights_once(objective_name, tmp_path):
    """With `release_model` (what a ZO run does) the torch model's frozen weights are dropped
    once a program holds them; evaluation through the engine's eval program equals torch's
    (loss, accuracies, macro-F1), and a program of a shape not seen yet is still exported
    (from the weights kept in the cache) and right."""
    pytest.importorskip("onnxruntime")
    from pocketllm.evaluate import evaluate
    model, params, obj, items, pad = _eval_setup(objective_name)
    ref = evaluate(model, items, 2, pad, objective=obj)
    batch = obj.collate(items, pad)
    reference = Reference(model, params, obj, batch, "rademacher")  # a copy, before release
    engine = REGISTRY["onnxruntime"](model, params, obj.stats, dist="rademacher",
                                     program_cache=str(tmp_path))
    engine.release_model()
    got = evaluate(model, items, 2, pad, objective=obj, stats=engine.scorer())
    frozen = [p for n, p in model.named_parameters() if ".lora_" not in n]
    assert frozen and all(p.is_meta for p in frozen)          # released: held by the program
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)
    assert (got.accuracy, got.macro_f1, got.token_accuracy, got.records, got.tokens) == \
        (ref.accuracy, ref.macro_f1, ref.token_accuracy, ref.records, ref.tokens)
    keys = [_keys(j, len(params)) for j in range(3)]
    plan = Plan(keys, EPS, REPLICAS, group_passes(REPLICAS, "both"))
    assert engine.losses(batch, plan).tolist() == pytest.approx(reference.losses(keys),
                                                                rel=1e-4)
    assert all(p.is_meta for n, p in model.named_parameters() if ".lora_" not in n)
    # each loaded program holds the weights: evaluation's are unloaded when training resumes
    assert {kind for kind, _ in engine.runners} == {"step"}


def test_a_run_through_an_engine_evaluates_saves_and_generates(tmp_path, capsys):
    """`pocketllm train --engine onnxruntime` with evaluations (before, during, after, the best
    adapter kept): its final valid figures equal torch's `pocketllm eval` of the adapter it
    saved, and `pocketllm generate` runs that adapter."""
    pytest.importorskip("onnxruntime")
    from pocketllm.cli import main
    from tests.test_cli import DATA, FAST
    out = tmp_path / "run"
    assert main(["train", *FAST, "--iters", "2", "--steps-per-eval", "1", "--save-every", "0",
                 "--method", "zo-sgd", "--engine", "onnxruntime", "--keep-best",
                 "--program-cache", str(tmp_path / "programs"), "--adapter-path", str(out)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    after = [m for m in metrics if m.get("eval_loss") is not None][-1]
    assert (out / "best" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    figures = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny-llama", "--data", DATA, "--split", "valid",
                 "--adapter-path", str(out), "--batch-size", "32", "--max-batches", "1",
                 "--max-seq-length", "128", "--json-out", str(figures)]) == 0
    ref = json.loads(figures.read_text())
    assert after["eval_loss"] == pytest.approx(ref["loss"], rel=1e-4)
    for k in ("accuracy", "exact_match", "token_accuracy"):
        assert after[f"eval_{k}"] == ref[k]
    assert main(["generate", "--model", "tiny-llama", "--adapter-path", str(out),
                 "--prompt", "Category:", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


# ------------------------------------------------------------------------- a quantized base

@pytest.mark.parametrize("engine_name,scheme,rel", [("onnxruntime", "int8", 5e-3),
                                                     ("onnxruntime", "int4", 3e-2),
                                                     ("onnxruntime", "int8-dynamic", 5e-3),
                                                     ("executorch", "int8-dynamic", 5e-3)])
def test_an_engine_builds_a_quantized_base_into_its_program(engine_name, scheme, rel,
                                                            tmp_path):
    """--quantize-base with an engine that builds it (`schemes`): the program's losses are the
    float reference's within the quantization's error, and not equal to them; the program is
    smaller than the float one. ONNX Runtime: the base Linears are MatMulNBits (7 a layer; LoRA
    and the head stay float). int8-dynamic, with LoRA on the top layer only: the layer below
    it, whose input no perturbation reaches, rounds its activations (MatMulInteger, ExecuTorch:
    XNNPACK's dynamically quantized linears); the top layer's weights are int8 with float
    activations (ONNX Runtime's MatMulNBits; ExecuTorch: float)."""
    from tests.zo.test_shared import _setup as shared_setup
    for mod in REGISTRY[engine_name].modules:
        pytest.importorskip(mod)
    dynamic = scheme == "int8-dynamic"
    model, params, obj, batch = (shared_setup("tiny-llama", "classification", lora_layers="1")
                                 if dynamic else _setup("tiny-llama", "lora", "classification"))
    keys = [_keys(j, len(params)) for j in range(3)]
    plan = Plan(keys, EPS, REPLICAS, group_passes(REPLICAS, "both"))
    ref = Reference(model, params, obj, batch, "rademacher").losses(keys)
    sizes = {}
    for q in ("none", scheme):
        cache = tmp_path / q
        engine = REGISTRY[engine_name](model, params, obj.stats, dist="rademacher",
                                       program_cache=str(cache), quantize=q)
        got = engine.losses(batch, plan).tolist()
        sizes[q] = sum(f.stat().st_size for f in cache.glob("*") if f.suffix != ".json")
        if q == "none":
            assert got == pytest.approx(ref, rel=1e-4)
        else:
            assert got == pytest.approx(ref, rel=rel)
            assert max(abs(a - b) for a, b in zip(got, ref)) > 1e-6  # really quantized
        if engine_name == "onnxruntime":
            import onnx
            (graph,) = cache.glob("*.onnx")
            ops = [n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node]
            layers = model.config.num_hidden_layers
            want = {"none": (0, 0), "int8-dynamic": (7, 7 * (layers - 1))}.get(q, (0, 7 * layers))
            assert (ops.count("MatMulInteger"), ops.count("MatMulNBits")) == want
    assert sizes[scheme] < 0.8 * sizes["none"]


@pytest.mark.parametrize("engine_name,scheme", [("executorch", "int4"), ("executorch", "int8")])
def test_an_engine_refuses_a_quantized_base_it_does_not_build(engine_name, scheme):
    cls = REGISTRY[engine_name]
    with pytest.raises(ValueError, match=rf"--engine {engine_name} builds .* not "
                                         rf"--quantize-base {scheme}: use --engine torch"):
        cls.load_scheme(scheme)
    assert REGISTRY["torch"].load_scheme(scheme) == scheme  # torch runs the model as loaded
    assert cls.load_scheme("none") == "none"


def test_a_run_through_onnx_runtime_on_a_4_bit_base(tmp_path, capsys):
    """`pocketllm train --engine onnxruntime --quantize-base int4` loads the float model,
    trains through 4-bit programs (its step losses near the float engine run's, not equal);
    `--engine executorch --quantize-base int4` (not a scheme XNNPACK's programs are built in
    here) is refused before the model loads."""
    pytest.importorskip("onnxruntime")
    from pocketllm.cli import main
    from tests.test_cli import FAST
    losses = {q: _step_losses(tmp_path, "onnxruntime", 2, q) for q in ("none", "int4")}
    assert losses["int4"] == pytest.approx(losses["none"], rel=3e-2)
    assert losses["int4"] != losses["none"]
    with pytest.raises(SystemExit, match="--engine executorch builds int8-dynamic into its "
                                         "programs, not --quantize-base int4"):
        main(["train", *FAST, "--iters", "1", "--method", "prge", "--engine", "executorch",
              "--quantize-base", "int4", "--adapter-path", str(tmp_path / "et")])
