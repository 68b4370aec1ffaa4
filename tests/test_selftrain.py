"""A program that trains itself (pocketllm/selftrain.py, examples/host/train_onnx.py): the whole
zeroth-order step exported to ONNX, run for a few steps by a host process that imports neither
pocketllm nor torch, whose ZO log replays in torch (`pocketllm replay`) to the program's own
final state: bit for bit under Rademacher z (prge, fzoo), within float32 rounding under
Gaussian z (zo-sgd, spsa); the program's losses are the torch engine's on the same plan, its
projected gradients pocketllm's estimator's on those losses; the host derives zo/log's keys.

One export and one host run per case for the module (a tiny Llama on a tiny SST-2 file)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketllm import engines
from pocketllm.cli import main
from pocketllm.replay import replay
from pocketllm.selftrain import build, key_words
from pocketllm.zo.log import KeySpace, ZOLog
from pocketllm.zo.plan import Plan, group_passes

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ROOT / "examples" / "host"
HOST = HOSTS / "train_onnx.py"
STEPS = 4
SENTENCES = [("a charming journey .", 1), ("great fun .", 1), ("lovely and warm .", 1),
             ("dull and slow .", 0), ("a boring mess .", 0), ("awful acting .", 0)]
# (method settings, replay bit for bit, the host's losses against eager float's: rtol):
# prge's defaults (fzoo, rademacher); zo-sgd's (spsa, gaussian z: the program's float32
# log/cos against the replay's kernel); prge on a 4-bit base (MatMulNBits in the program:
# its losses are the float model's within the quantization's error; the log still replays
# exactly, since a replay adds seeded z and never reads the base)
CASES = {"prge": ("method: prge\nqueries: 3\n", True, 1e-5),
         "zo-sgd": ("method: zo-sgd\nlearning-rate: 1.0e-2\neps: 1.0e-2\n", False, 1e-5),
         "prge-int4": ("method: prge\nqueries: 3\nquantize-base: int4\n", True, 3e-2)}


def _host():
    spec = importlib.util.spec_from_file_location("host", HOSTS / "host.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(d: Path, method: str) -> Path:
    data = d / "sst2"
    data.mkdir(parents=True)
    rows = "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in SENTENCES)
    (data / "train.tsv").write_text(rows)
    (data / "dev.tsv").write_text(rows)
    cfg = d / "run.yaml"
    cfg.write_text(f"model: tiny-llama\ntask: sst2\ndata: {data}\nk: 2\nbatch-size: 2\n"
                   f"iters: {STEPS}\nseed: 5\n" + CASES[method][0])
    return cfg


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """case -> (case, its config, the bundle, the host's run directory) after the ONNX host
    ran STEPS steps; each case exported and run once for the module, on first use."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    done = {}

    def get(case):
        if case not in done:
            d = tmp_path_factory.mktemp(case)
            cfg = _config(d, case)
            bundle, run = d / "bundle", d / "run"
            assert main(["export", "--format", "onnx", "--trainable", str(cfg), "--out",
                         str(bundle)]) == 0
            # a process of its own, started without pocketllm on its path: it cannot import it
            p = subprocess.run([sys.executable, str(HOST), str(bundle), str(run), "--threads",
                                "1"], capture_output=True, text=True, cwd=d,
                               env={"PATH": "/usr/bin:/bin"}, timeout=300)
            assert p.returncode == 0, p.stderr
            done[case] = case, cfg, bundle, run
        return done[case]
    return get


@pytest.fixture(params=sorted(CASES))
def hosted(request, hosts):
    return hosts(request.param)


def test_the_host_derives_zo_logs_keys():
    host = _host()
    for seed in (0, 5, 2**32 - 1):
        for step in (0, 1, 999):
            k1, k2 = host.step_keys(seed, step, 3, 4)
            w1, w2 = key_words(KeySpace(seed).keys(step, 3, 4))
            assert np.array_equal(k1, w1.numpy()) and np.array_equal(k2, w2.numpy())


def test_the_hosts_log_replays_in_torch_to_the_programs_state(hosted, tmp_path):
    case, _, bundle, run = hosted
    report = json.loads((run / "host.json").read_text())
    assert report["steps"] == STEPS and report["torch_imported"] is False
    head, steps = ZOLog(run).read()
    assert len(steps) == STEPS
    model, n = replay(run, tmp_path / "replayed")
    assert n == STEPS
    named = dict(model.named_parameters())
    got = torch.cat([named[p].detach().reshape(-1) for p in head["params"]])
    final = torch.from_numpy(np.load(run / "state.npz")["train"])
    start = torch.from_numpy(np.load(bundle / "state.npz")["train"])
    assert (final - start).abs().max() > 1e-4  # it trained
    if CASES[case][1]:
        assert torch.equal(got, final)
    else:  # gaussian z: float32 log/cos in the program, ~2e-6 per z, times each update's
        # coefficient lr * g / q (~1e-2 here): ~1e-8 a step (measured: 1.5e-8 after 4)
        assert (got - final).abs().max() <= 1e-6


def test_the_program_step_is_pocketllms_step(hosted):
    """Step 0 eagerly: the W losses equal the torch engine's for the method's own plan; the
    projected gradients are the estimator's on those losses; ONNX Runtime's losses equal
    eager's and its gradients are the estimator's on its own losses."""
    case, cfg, _, run = hosted
    step, example, manifest, _, _, _ = build(str(cfg), 1, engines.REGISTRY["onnxruntime"])
    est = step.estimator
    with torch.no_grad():
        new, L, g = step(**example)
    # the method's torch engine on the same batch and keys (the plan training would run)
    ref = _torch_losses(cfg, manifest)
    assert torch.allclose(L.double(), ref, rtol=1e-5, atol=0)
    eps = float(example["eps"])
    assert torch.equal(g, torch.tensor(est.projected(L.double(), eps), dtype=torch.float64))
    ort = torch.tensor(json.loads((run / "host.json").read_text())["replica_losses"][0])
    assert torch.allclose(ort, L, rtol=CASES[case][2], atol=0)
    assert manifest["quantize_base"] == ("int4" if case.endswith("int4") else "none")
    if manifest["quantize_base"] != "none":  # the program's base is not the float one
        assert (ort - L).abs().max() > 1e-6
    logged = ZOLog(run).read()[1][0]["projected_grads"]
    assert np.allclose(logged, est.projected(ort.double(), eps), rtol=1e-9, atol=1e-12)


def _torch_losses(cfg, manifest) -> torch.Tensor:
    """Step 0's replica losses through pocketllm's own method and torch engine."""
    from pocketllm.data import Batcher
    from pocketllm.data.source import load_run_data
    from pocketllm.models import load_model
    from pocketllm.schedules import eps_at
    from pocketllm.selftrain import _run_settings
    args, zcfg, method_cls = _run_settings(str(cfg))
    data = load_run_data(args)
    model, tok = load_model(args.model, args.dtype)
    if args.quantize_base != "none":  # the program's tables are int8 rows, as torch's scheme
        from pocketllm.quantize import quantize_tables  # (its Linears are quantized later,
        quantize_tables(model)                          # by the runtime's quantizer)
    enc = data.encode(tok, False, args.max_seq_length, args.mask_prompt)
    objective = data.objective(tok)
    _, params = method_cls.trainable(model, args)
    method = method_cls(model, params, zcfg, args, objective)
    batch = Batcher(enc["train"].items, args.batch_size, args.seed, tok.pad_token_id, 1,
                    objective.collate)(0, 0)
    plan = Plan(method.keys(0), eps_at(zcfg, 0, args.iters), method.replicas,
                group_passes(method.replicas, "both"))
    return method.engine.losses(batch, plan)


def test_what_the_program_cannot_run_is_one_line(tmp_path, capsys):
    cfg = _config(tmp_path, "prge")
    first_order = tmp_path / "fo.yaml"
    first_order.write_text(cfg.read_text().replace("method: prge\nqueries: 3\n",
                                                   "method: lora-adam\n"))
    adam = tmp_path / "adam.yaml"
    adam.write_text(cfg.read_text() + "zo-optimizer: adam\n")
    for bad, says in ((first_order, "not zeroth-order"), (adam, "zo-optimizer adam")):
        with pytest.raises(SystemExit, match=says):
            main(["export", "--format", "onnx", "--trainable", str(bad),
                  "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="set model there"):
        main(["export", "--format", "onnx", "--trainable", str(cfg), "--model", "tiny-gpt2"])
    quantized = tmp_path / "q.yaml"
    quantized.write_text(cfg.read_text() + "quantize-base: int4\n")
    with pytest.raises(SystemExit, match="the self-training .pte runs a float base, not "
                                         "quantize-base int4"):
        main(["export", "--format", "pte", "--trainable", str(quantized),
              "--out", str(tmp_path / "x")])


def test_the_host_refuses_more_steps_than_the_bundle_holds(hosted, tmp_path):
    _, _, bundle, _ = hosted
    p = subprocess.run([sys.executable, str(HOST), str(bundle), str(tmp_path / "r"),
                        "--steps", str(STEPS + 1)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "holds 4 batches" in p.stderr


# ---- the stateful ExecuTorch program (--format pte) ----------------------------------------

@pytest.fixture(scope="module")
def pte(hosts, tmp_path_factory):
    """The prge case as one .pte (state inside), and the pte host's run of STEPS."""
    pytest.importorskip("executorch.runtime", reason="the executorch extra is not installed")
    _, cfg, _, onnx_run = hosts("prge")
    d = tmp_path_factory.mktemp("pte")
    bundle, run = d / "bundle", d / "run"
    assert main(["export", "--format", "pte", "--trainable", str(cfg), "--out",
                 str(bundle)]) == 0
    p = subprocess.run([sys.executable, str(HOSTS / "train_pte.py"), str(bundle), str(run),
                        "--threads", "1"], capture_output=True, text=True, cwd=d, timeout=300)
    assert p.returncode == 0, p.stderr
    return cfg, bundle, run, onnx_run


def test_the_pte_hosts_log_replays_and_its_steps_are_the_onnx_programs(pte, tmp_path):
    cfg, bundle, run, onnx_run = pte
    model, n = replay(run, tmp_path / "replayed")
    head, _ = ZOLog(run).read()
    named = dict(model.named_parameters())
    got = torch.cat([named[p].detach().reshape(-1) for p in head["params"]])
    assert n == STEPS and torch.equal(got, torch.from_numpy(np.load(run / "state.npz")["train"]))
    mine = json.loads((run / "host.json").read_text())["replica_losses"]
    onnx = json.loads((onnx_run / "host.json").read_text())["replica_losses"]
    assert np.allclose(mine, onnx, rtol=1e-5, atol=0)


def test_the_pte_state_is_initialised_shared_and_persists(pte):
    """get_state starts at the exported adapter (not zeros); step moves it and the next call
    sees it; eval reads it; set_state replaces it, and a step from the initial state again
    gives the first step's losses again."""
    from executorch.runtime import Runtime
    cfg, bundle, _, _ = pte
    step, example, *_ = build(str(cfg), 1, engines.REGISTRY["executorch"])
    prog = Runtime.get().load_program(str(bundle / "step.pte"))
    m = {k: prog.load_method(k) for k in ("step", "eval", "get_state", "set_state")}
    batch = [example[k] for k in ("input_ids", "attention_mask", "pos", "targets", "cands",
                                  "weight")]
    keys = [example[k] for k in ("k1", "k2", "lr", "eps")]
    start = example["train"]
    assert torch.equal(m["get_state"].execute([])[0], start)
    zero = torch.zeros(1, len(step.program.slices), dtype=torch.int64)
    with torch.no_grad():
        new, L, g = step(**example)
        plain = step.program(*batch, start, example["fixed"], zero, zero, torch.zeros(1))
    assert torch.allclose(m["eval"].execute(batch)[0], plain, rtol=1e-5)
    L1, g1 = m["step"].execute([*batch, *keys])
    assert torch.allclose(L1, L, rtol=1e-5)
    after = m["get_state"].execute([])[0]
    assert not torch.equal(after, start) and torch.allclose(after, new, atol=1e-6)
    L2, _ = m["step"].execute([*batch, *keys])  # from the moved state: other losses
    assert not torch.equal(L2, L1)
    assert torch.equal(m["set_state"].execute([start])[0], start)
    assert torch.equal(m["get_state"].execute([])[0], start)
    assert torch.equal(m["step"].execute([*batch, *keys])[0], L1)
