"""The ZO step log: old logs replay and resume bit for bit, key spaces, reading and its errors."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocketllm.cli import main
from pocketllm.config import read_run_config
from pocketllm.lora import save_adapter
from pocketllm.models import load_model
from pocketllm.trainable import setup_trainable
from pocketllm.zo import noise, optim, perturbations
from pocketllm.zo.log import FORMAT, NAME, KeySpace, ZOLog, estimate_of, header, replay_log

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "zo_logs"
# Logs written by pocketllm at c66366a (format /1), with the flags that made them (README.md
# there); the flags continue them with --resume.
COMMON = ["--model", "tiny-llama", "--data", str(ROOT / "examples" / "personal"),
          "--batch-size", "2", "--max-seq-length", "128", "--steps-per-eval", "0",
          "--val-batches", "1"]
RUNS = {"zo-sgd-lora": ["--method", "zo-sgd", "--trainable", "lora", "--learning-rate", "1e-3"],
        # written when prge's defaults were P-RGE's two-point estimate with gaussian z
        "prge-q2-adam": ["--method", "prge", "--estimator", "spsa", "--perturbation", "gaussian",
                         "--eps", "1e-2", "--trainable", "lora", "--queries", "2",
                         "--zo-optimizer", "adam", "--learning-rate", "1e-3", "--seed", "3"],
        "zo-sgd-full": ["--method", "zo-sgd", "--trainable", "full", "--learning-rate", "1e-4",
                        "--seed", "11"]}


# ZO-Adam's elementwise arithmetic (moments, bias correction, sqrt, division) does not round
# the same on every x86 CPU: replayed on an AMD EPYC (Zen 5) the Intel Xeon's prge-q2-adam log
# gave 367 of 3,584 LoRA values 1 ulp away (at most 3.7e-9 on weights up to 0.13); the plain
# SGD logs replay bit for bit on both. So that fixture is held to 4 ulp of its largest weight,
# not bit for bit; on one machine, replay and resume agree bit for bit
# (`test_a_run_resumes_from_an_old_log`).
ACROSS_CPUS = {"prge-q2-adam": 6e-8}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _assert_trained_weights(name: str, weights: dict[str, torch.Tensor]) -> None:
    """`weights` are bit for bit those the fixture's run trained."""
    fx = FIXTURES / name
    if (fx / "adapter_model.safetensors").is_file():
        want = load_file(str(fx / "adapter_model.safetensors"))
        assert weights.keys() == want.keys()
        tol = ACROSS_CPUS.get(name, 0.0)
        for k in want:
            assert (weights[k] - want[k]).abs().max() <= tol, k
    else:  # full weights, kept as per-tensor digests
        want = json.loads((fx / "weights.sha256.json").read_text())
        assert weights.keys() == want.keys()
        for k, t in weights.items():
            assert _digest(t) == want[k]["sha256"], k


def _saved_weights(out: Path) -> dict[str, torch.Tensor]:
    """The adapter or full weights saved in `out` (by replay, or by train: `out/model`)."""
    for f in ("adapter_model.safetensors", "model.safetensors", "model/model.safetensors"):
        if (out / f).is_file():
            return load_file(str(out / f))
    raise FileNotFoundError(f"no weights in {out}")


@pytest.mark.parametrize("name", RUNS)
def test_an_old_log_replays_bit_for_bit_through_the_library(name, tmp_path):
    fx = FIXTURES / name
    head, steps = ZOLog(fx).read()
    assert head["format"] == "pocketllm-zo-log/1" and len(steps) == 5
    assert (head["run"], head["round"], head["client"]) == (0, 0, 0)  # filled in for /1
    args, _ = read_run_config(fx / "config.yaml")
    model, _ = load_model(args.model, args.dtype)
    spec, params = setup_trainable(model, args)
    assert [n for n, _ in params] == head["params"]
    replay_log(head, steps, params)
    # saved as the run saved them (an adapter's tensors go by their PEFT names)
    if spec is not None:
        save_adapter(model, tmp_path, spec, base_model=args.model)
    else:
        model.save_pretrained(tmp_path)
    _assert_trained_weights(name, _saved_weights(tmp_path))


@pytest.mark.parametrize("name", RUNS)
def test_an_old_log_replays_bit_for_bit_through_the_cli(name, tmp_path):
    assert main(["replay", "--adapter-path", str(FIXTURES / name),
                 "--save-path", str(tmp_path / "re")]) == 0
    _assert_trained_weights(name, _saved_weights(tmp_path / "re"))


@pytest.mark.parametrize("name", RUNS)
def test_a_run_resumes_from_an_old_log(name, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(FIXTURES / name / NAME, out / NAME)
    with open(out / NAME, "ab") as f:
        f.write(b'{"step": 5, "projected_gr')  # and torn by a kill
    assert main(["train", *COMMON, *RUNS[name], "--iters", "8", "--resume",
                 "--adapter-path", str(out)]) == 0
    assert f"resumed from {out} at step 5" in capsys.readouterr().out
    # the old records are kept as they were; the new ones continue them
    old = (FIXTURES / name / NAME).read_text().splitlines()
    new = (out / NAME).read_text().splitlines()
    assert new[1:6] == old[1:6] and [json.loads(l)["step"] for l in new[6:]] == [5, 6, 7]
    # the resumed run's weights are the replay of the whole log: its first five steps rebuilt
    # from the old log, optimizer state included, before the three it computed
    assert main(["replay", "--adapter-path", str(out), "--save-path", str(tmp_path / "re")]) == 0
    a = _saved_weights(tmp_path / "re")
    b = _saved_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_zero_key_space_is_the_old_formula():
    for seed in (0, 3, -1, 2**40 + 7):
        for step in (0, 1, 17):
            q, n = 3, 5
            want = [[noise.derive_key(seed, step, j * n + i) for i in range(n)] for j in range(q)]
            assert KeySpace(seed).keys(step, q, n) == want
            assert KeySpace(seed, 0, 0, 0).keys(step, q, n) == want


def test_key_spaces_of_clients_rounds_and_runs_never_collide():
    q, n = 2, 4
    seen = {}
    for seed in range(3):
        for run in range(3):
            for rnd in range(4):
                for client in range(5):
                    space = KeySpace(seed, run, rnd, client)
                    for step in range(8):
                        for j, ks in enumerate(space.keys(step, q, n)):
                            for i, k in enumerate(ks):
                                where = (seed, run, rnd, client, step, j, i)
                                assert seen.setdefault(k, where) == where, (k, where, seen[k])
    assert len(seen) == 3 * 3 * 4 * 5 * 8 * q * n
    # the same (step, query, tensor) of two clients: no relation in the low or high halves
    # either, which the noise uses separately (rademacher signs, gaussian angles)
    a, b = KeySpace(0, client=1).keys(0, 1, 64)[0], KeySpace(0, client=2).keys(0, 1, 64)[0]
    assert not {k & 0xFFFFFFFF for k in a} & {k & 0xFFFFFFFF for k in b}
    assert not {k >> 32 for k in a} & {k >> 32 for k in b}


def test_key_space_refuses_bad_coordinates():
    with pytest.raises(ValueError, match="client"):
        KeySpace(0, client=-1)
    with pytest.raises(ValueError, match="round"):
        KeySpace(0, round=1.5)


def _log(tmp_path, **space) -> ZOLog:
    log = ZOLog(tmp_path)
    log.start(header(KeySpace(7, **space), dist="gaussian", trainable="lora", dtype="float32",
                     params=["a", "b"], queries=1, optimizer={"name": "sgd"}), fresh=True)
    for s in range(3):
        log.append({"step": s, "projected_grads": [0.5 - s], "lr": 0.1})
    return log


def test_a_log_reads_back_with_its_key_space(tmp_path):
    head, steps = _log(tmp_path, run=1, round=2, client=3).read()
    assert head["format"] == FORMAT and KeySpace.of(head) == KeySpace(7, 1, 2, 3)
    assert [r["step"] for r in steps] == [0, 1, 2]


def test_a_torn_last_line_is_ignored_and_dropped_on_resume(tmp_path):
    log = _log(tmp_path)
    with open(log.path, "ab") as f:
        f.write(b'{"step": 3, "projected_gr')
    head, steps = log.read()
    assert len(steps) == 3
    params = [("a", torch.zeros(4)), ("b", torch.zeros(2))]
    assert log.restore(head, params, optim.build({"name": "sgd"}, [p for _, p in params])) == 3
    assert log.path.read_bytes().endswith(b'"lr": 0.1}\n')  # rewritten without the torn line
    assert not log.path.with_name(NAME + ".tmp").exists()
    # restore replayed what replay_log replays
    ref = [("a", torch.zeros(4)), ("b", torch.zeros(2))]
    replay_log(head, steps, ref)
    assert all(torch.equal(p, r) for (_, p), (_, r) in zip(params, ref))
    assert any(p.abs().sum() > 0 for _, p in params)


def test_a_corrupt_middle_line_is_refused_with_its_path_and_line(tmp_path):
    log = _log(tmp_path)
    lines = log.path.read_bytes().split(b"\n")
    lines[2] = lines[2][:10]  # step 1's record, line 3
    log.path.write_bytes(b"\n".join(lines))
    with pytest.raises(SystemExit, match=f"{log.path}:3: corrupt record"):
        log.read()
    lines[2] = b'{"step": 5, "lr": 0.1}'
    log.path.write_bytes(b"\n".join(lines))
    with pytest.raises(SystemExit, match=f"{log.path}:3: step 5 out of order"):
        log.read()


def test_a_bad_header_is_refused(tmp_path):
    log = _log(tmp_path)
    text = log.path.read_text().split("\n", 1)[1]
    for head, msg in (({"format": "other/1"}, "not a pocketllm ZO log"),
                      ({"format": FORMAT, "seed": 1}, ":1: header lacks run, round, client"),
                      ("{not json", ":1: the header is not JSON")):
        log.path.write_text((head if isinstance(head, str) else json.dumps(head)) + "\n" + text)
        with pytest.raises(SystemExit, match=msg):
            log.read()
    log.path.write_text("")
    with pytest.raises(SystemExit, match="empty ZO log"):
        log.read()


@pytest.mark.parametrize("field,value", [("seed", 8), ("client", 1), ("round", 4),
                                         ("queries", 2), ("optimizer", {"name": "adam"})])
def test_resume_refuses_a_log_of_a_different_run(tmp_path, field, value):
    log = _log(tmp_path)
    head, _ = log.read()
    mine = {**head, field: value}
    with pytest.raises(SystemExit, match=rf"--resume: .* was written by a different run "
                                         rf"\({field}: .* there, .* now\)"):
        log.restore(mine, [("a", torch.zeros(4)), ("b", torch.zeros(2))], None)


def test_resume_of_a_log_killed_before_its_header_restores_nothing(tmp_path):
    log = ZOLog(tmp_path)
    log.path.write_bytes(b'{"format": "pocketllm-zo-log/2", "se')
    assert log.restore({}, [], None) == 0
    assert ZOLog(tmp_path / "nowhere").restore({}, [], None) == 0


def test_resume_refuses_a_log_of_another_estimator(tmp_path, registered_estimator):
    """The header names the estimator whose scalars the log holds (logs before it: spsa)."""
    from tests.test_cli import FAST
    out = tmp_path / "run"
    assert main(["train", *FAST, "--iters", "2", "--steps-per-eval", "0", "--no-eval-before",
                 "--adapter-path", str(out)]) == 0
    head, _ = ZOLog(out).read()
    assert head["estimator"] == "spsa"
    with pytest.raises(SystemExit, match="estimator: 'spsa' there, 'other' now"):
        main(["train", *FAST, "--iters", "3", "--steps-per-eval", "0", "--no-eval-before",
              "--estimator", "other", "--resume", "--adapter-path", str(out)])


@pytest.fixture
def registered_estimator(monkeypatch):
    from pocketllm.zo import estimators
    from pocketllm.zo.estimators.spsa import SPSA

    class Other(SPSA):
        pass
    monkeypatch.setitem(estimators.REGISTRY, "other", Other)
    Other.name = "other"


def test_a_record_s_estimate_adds_the_anchor_s_along_the_refresh_step_s_keys():
    """An anchored estimator's step (svrg): its q projected grads along its own keys, then the
    anchor's q along the refresh step's, all under the step's 1/q; a plain record: its own."""
    space, dense = KeySpace(5), perturbations.build({"name": "dense"}, (), "gaussian")
    plain = estimate_of({"step": 7, "projected_grads": [0.5, -1.0]}, space, 3, dense)
    assert plain.keys == space.keys(7, 2, 3) and plain.grads == [0.5, -1.0]
    assert plain.coefs(0.1) == pytest.approx([-0.025, 0.05])
    rec = {"step": 7, "projected_grads": [0.5, -1.0], "anchor": 3, "anchor_grads": [2.0, 4.0]}
    est = estimate_of(rec, space, 3, dense)
    assert est.keys == space.keys(7, 2, 3) + space.keys(3, 2, 3)
    assert est.coefs(0.1) == pytest.approx([-0.025, 0.05, -0.1, -0.2])
    w = torch.zeros(8)
    want = sum(c * noise.noise(k[0], 0, 8, "gaussian") for k, c in zip(est.keys, est.coefs(0.1)))
    assert torch.allclose(est.dense(0, w) * -0.1, want, atol=1e-6)


def test_a_record_s_anchor_is_drawn_by_the_run_s_perturbation():
    """With another perturbation (lowrank) the anchor's z is that perturbation's z of the
    refresh step's keys: its U and its subspace V (a window before the step's)."""
    space, w = KeySpace(5), torch.randn(6, 4)
    lowrank = perturbations.build({"name": "lowrank", "rank": 2, "refresh": 2}, [w], "gaussian")
    rec = {"step": 7, "projected_grads": [0.5], "anchor": 3, "anchor_grads": [2.0]}
    est = estimate_of(rec, space, 1, lowrank)
    assert est.perturbation is lowrank and est.q == 1
    assert est.keys == lowrank.keys(space, 7, 1, 1) + lowrank.keys(space, 3, 1, 1)
    assert est.keys[0][0][1] != est.keys[1][0][1]  # windows 3 and 1: different subspaces
    want = 0.5 * lowrank.z(0, est.keys[0][0], w) + 2.0 * lowrank.z(0, est.keys[1][0], w)
    assert torch.allclose(est.dense(0, w), want, atol=1e-6)
    assert torch.linalg.matrix_rank(est.dense(0, w)) <= 4  # two rank-2 directions
