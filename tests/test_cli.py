"""The CLI end to end on tiny-llama: train, eval, generate, fuse, replay; config handling."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocketllm.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA = str(ROOT / "examples" / "personal")
FAST = ["--model", "tiny-llama", "--data", DATA, "--batch-size", "4", "--max-seq-length", "128",
        "--eval-batch-size", "32", "--val-batches", "1", "--steps-per-report", "5"]


def test_train_eval_generate_fuse(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--iters", "12", "--steps-per-eval", "6", "--save-every", "6",
                 "--adapter-path", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out loss" in text and "peak memory" in text and str(out) in text
    for f in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
              "zo_log.jsonl", "summary.json"):
        assert (out / f).is_file(), f
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    assert {m["step"] for m in metrics if "eval_loss" in m} == {0, 6, 12}
    # greppable report lines
    assert "step 10 | loss" in text and "tok/s" in text and "peak_rss" in text

    assert main(["eval", "--model", "tiny-llama", "--data", DATA, "--split", "valid",
                 "--adapter-path", str(out), "--max-batches", "1"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["generate", "--model", "tiny-llama", "--prompt", "Note:", "--max-tokens", "5",
                 "--adapter-path", str(out)]) == 0
    fused = tmp_path / "fused"
    assert main(["fuse", "--model", "tiny-llama", "--adapter-path", str(out),
                 "--save-path", str(fused)]) == 0
    assert (fused / "config.json").is_file() and (fused / "model.safetensors").is_file()
    # the fused directory is a model pocketllm (and transformers) can load
    assert main(["eval", "--model", str(fused), "--data", DATA, "--split", "valid",
                 "--max-batches", "1"]) == 0


def test_yaml_config_with_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny-llama\niters: 3\nlearning-rate: 1e-2\nlora_rank: 2\n"
                   f"data: {DATA}\nmax-seq-length: 128\nbatch-size: 2\n")
    out = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--iters", "4", "--adapter-path", str(out),
                 "--val-batches", "1"]) == 0
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["iters"] == 4 and saved["learning_rate"] == 1e-2 and saved["lora_rank"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_bad_config_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lerning-rate: 1\n")
    assert main(["train", "-c", str(cfg)]) == 2  # a refused setting, as argparse exits
    assert "lerning-rate" in capsys.readouterr().err


def test_malformed_data_fails_before_training(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert main(["train", "--model", "tiny-llama", "--data", str(d), "--adapter-path",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:2" in err and "completion" in err


def test_full_parameter_replay_rebuilds_the_weights(tmp_path):
    out = tmp_path / "full"
    assert main(["train", *FAST, "--trainable", "full", "--learning-rate", "1e-4", "--eps", "1e-3",
                 "--iters", "8", "--adapter-path", str(out)]) == 0
    log = (out / "zo_log.jsonl").read_bytes()
    assert len(log) < 8 * 400 + 4000  # a few hundred bytes a step
    rebuilt = tmp_path / "rebuilt"
    assert main(["replay", "--adapter-path", str(out), "--save-path", str(rebuilt)]) == 0
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from pocketllm.models import load_model
    base, _ = load_model("tiny-llama")
    assert any(not torch.equal(a[k], v) for k, v in base.state_dict().items() if k in a)


def test_console_script_help():
    exe = Path(sys.executable).parent / "pocketllm"
    r = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--model", "--data", "--method", "--trainable", "--lora-rank", "--lora-targets",
                 "--iters", "--batch-size", "--learning-rate", "--eps", "--seed", "--adapter-path",
                 "--resume", "--save-every", "--steps-per-eval", "--max-seq-length", "--dtype",
                 "--grad-accumulation"):
        assert flag in r.stdout, flag


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-opt", "tiny-gemma"])
@pytest.mark.parametrize("trainable,dtype", [("lora", "float32"), ("full", "bfloat16")])
def test_train_other_families_and_bfloat16(tmp_path, name, trainable, dtype):
    out = tmp_path / "run"
    args = [a if a != "tiny-llama" else name for a in FAST]
    assert main(["train", *args, "--iters", "3", "--trainable", trainable, "--dtype", dtype,
                 "--adapter-path", str(out)]) == 0
    assert (out / ("adapter_model.safetensors" if trainable == "lora" else "model")).exists()


def _sst2_dir(tmp_path):
    d = tmp_path / "sst2"
    d.mkdir()
    rows = [("a charming , affecting journey", 1), ("flat and dull", 0), ("a joy", 1),
            ("tedious mess", 0), ("warm and funny", 1), ("painfully slow", 0)] * 4
    body = "".join(f"{s} {i}\t{l}\n" for i, (s, l) in enumerate(rows))
    (d / "train.tsv").write_text("sentence\tlabel\n" + body)
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(body.splitlines(True)[:12]))
    return d


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-roberta"])
def test_task_train_and_eval_end_to_end(tmp_path, capsys, model):
    d, out = _sst2_dir(tmp_path), tmp_path / "run"
    assert main(["train", "--model", model, "--task", "sst2", "--data", str(d), "--k", "4",
                 "--iters", "6", "--batch-size", "4", "--test-every", "3", "--steps-per-eval", "0",
                 "--adapter-path", str(out)]) == 0
    text = capsys.readouterr().out
    assert "task sst2 (train 8, valid 8, test 12)" in text and "held-out accuracy" in text
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    tests = [m for m in metrics if "test_accuracy" in m]
    assert [m["step"] for m in tests] == [0, 3, 6] and all("wall" in m for m in tests)
    # the method's defaults were filled in and saved with the run
    cfg = (out / "config.yaml").read_text()
    assert "learning_rate: 0.003" in cfg and "eps: 0.01" in cfg  # zo-sgd lora:task
    assert main(["eval", "--model", model, "--task", "sst2", "--data", str(d),
                 "--adapter-path", str(out)]) == 0
    assert "task sst2 test (12 records" in capsys.readouterr().out


def test_task_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "--model", "tiny-llama", "--task", "rte", "--data", str(tmp_path)]) == 2
    assert "val.jsonl: no such file" in capsys.readouterr().err


def test_keep_best_keeps_the_best_valid_adapter(tmp_path, capsys):
    """--keep-best: ADAPTER_PATH/best holds the adapter of the best valid evaluation, its
    record in the weights' header (kill -9 and --resume: tests/test_resume.py)."""
    import re

    from pocketllm.train import read_best
    d = _sst2_dir(tmp_path)
    run = ["train", "--model", "tiny-llama", "--task", "sst2", "--data", str(d), "--k", "4",
           "--batch-size", "4", "--steps-per-eval", "2", "--save-every", "2", "--keep-best",
           "--learning-rate", "0.05"]
    whole = tmp_path / "whole"
    assert main([*run, "--iters", "8", "--adapter-path", str(whole)]) == 0
    assert "best on valid" in capsys.readouterr().out
    metrics = [json.loads(l) for l in (whole / "metrics.jsonl").read_text().splitlines()]
    valid = [(m["eval_accuracy"], -m["eval_loss"], m["step"]) for m in metrics
             if "eval_loss" in m]
    assert [v[2] for v in valid] == [0, 2, 4, 6, 8]
    best = read_best(whole / "best")
    acc, neg_loss, step = max(valid, key=lambda v: (v[0], v[1], -v[2]))  # first of the best
    assert best["step"] == step and best["score"] == [acc, neg_loss]
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["best"]["step"] == step
    # the kept adapter scores on valid what was recorded for it
    assert main(["eval", "--model", "tiny-llama", "--task", "sst2", "--data", str(d), "--k", "4",
                 "--split", "valid", "--adapter-path", str(whole / "best")]) == 0
    loss = float(re.search(r"loss (\d+\.\d+)", capsys.readouterr().out).group(1))
    assert loss == pytest.approx(best["valid_loss"], abs=2e-4)
    # full parameters: refused with a reason
    with pytest.raises(SystemExit, match="--keep-best keeps a LoRA adapter"):
        main([*run, "--iters", "2", "--trainable", "full", "--adapter-path", str(tmp_path / "f")])
    with pytest.raises(SystemExit, match="--keep-best is not available with --method side"):
        main([*run, "--iters", "2", "--method", "side", "--adapter-path", str(tmp_path / "s")])


def test_keep_best_is_on_by_default_where_it_is_a_small_copy(tmp_path, capsys):
    """No flag: a LoRA run keeps its best valid adapter; a full-parameter run and split mode
    run without it (no refusal); --no-keep-best turns it off."""
    d = _sst2_dir(tmp_path)
    run = ["train", "--model", "tiny-llama", "--task", "sst2", "--data", str(d), "--k", "4",
           "--batch-size", "4", "--steps-per-eval", "2", "--iters", "2"]
    assert main([*run, "--adapter-path", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "best" / "adapter_model.safetensors").exists()
    assert "keep_best: true" in (tmp_path / "lora" / "config.yaml").read_text()
    assert main([*run, "--no-keep-best", "--adapter-path", str(tmp_path / "off")]) == 0
    assert not (tmp_path / "off" / "best").exists()
    assert main([*run, "--trainable", "full", "--adapter-path", str(tmp_path / "full")]) == 0
    assert not (tmp_path / "full" / "best").exists()
    assert "keep_best: false" in (tmp_path / "full" / "config.yaml").read_text()


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_counts_the_chosen_clock(tmp_path, capsys, clock):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--iters", "50", "--time-budget", "0.00002", "--budget-clock",
                 clock, "--steps-per-eval", "0", "--adapter-path", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert f"budget_clock: {clock}" in (out / "config.yaml").read_text()


def test_time_budget_stops_training_and_saves_what_was_trained(tmp_path, capsys):
    out = tmp_path / "run"
    # a budget of 1 ms: the first step spends it
    assert main(["train", *FAST, "--iters", "50", "--time-budget", "0.00002",
                 "--steps-per-eval", "0", "--adapter-path", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["after"] is not None
    assert "time budget of 2e-05 min spent" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").exists()
    log = (out / "zo_log.jsonl").read_text().splitlines()
    assert len(log) == 2  # the header and the one step: replay rebuilds the saved adapter


@pytest.mark.parametrize("flags,why", [
    (["--estimator", "fzoo"], "fzoo needs at least 2 queries"),
    # out of the flag's declared range: refused as the flags are parsed
    (["--method", "prge", "--queries", "0"], "--queries: must be an integer >= 1, got 0"),
    (["--max-replicas", "-1"], "--max-replicas: must be an integer >= 0, got -1"),
])
def test_bad_zo_settings_are_refused_before_the_model_loads(tmp_path, capsys, flags, why):
    # the model name is never resolved: the settings fail first, with the reason
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "no-such-model", "--data", DATA, *flags,
              "--adapter-path", str(tmp_path)])
    assert why in f"{e.value.code} {capsys.readouterr().err}"


@pytest.mark.parametrize("flag,value,why", [
    ("--learning-rate", "nan", "must be a finite number >= 0, got nan"),  # was: a NaN adapter
    ("--iters", "-1", "must be an integer >= 1, got -1"),  # was: an untrained adapter, exit 0
    ("--batch-size", "0", "must be an integer >= 1, got 0"),  # was: a traceback
])
def test_nonsense_is_refused_before_the_run_starts(tmp_path, capsys, flag, value, why):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", *FAST, "--iters", "3", flag, value, "--adapter-path", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"pocketllm train: error: argument {flag}: {why} "
                                       "(see pocketllm train --help)\n")
    assert not out.exists()


def test_console_script_refuses_a_nan_rate_in_one_line(tmp_path):
    exe = Path(sys.executable).parent / "pocketllm"
    r = subprocess.run([str(exe), "train", *FAST, "--learning-rate", "nan", "--adapter-path",
                        str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["pocketllm train: error: argument --learning-rate: must be "
                                     "a finite number >= 0, got nan (see pocketllm train --help)"]
    assert not (tmp_path / "run").exists()


def test_the_lr_schedule_ends_with_the_time_budget(tmp_path, capsys, monkeypatch):
    import itertools
    from pocketllm import train as train_mod
    ticks = itertools.count()  # a clock on which every step takes exactly one second
    monkeypatch.setitem(train_mod.CLOCKS, "wall", lambda: float(next(ticks)))
    out = tmp_path / "run"
    # 6 s of budget, 5000 steps: the budget ends the run, so the linear decay must end there
    assert main(["train", *FAST, "--iters", "5000", "--time-budget", "0.1", "--learning-rate",
                 "1e-2", "--lr-schedule", "linear", "--steps-per-eval", "0",
                 "--adapter-path", str(out)]) == 0
    steps = [json.loads(line) for line in (out / "zo_log.jsonl").read_text().splitlines()[1:]]
    assert [s["lr"] for s in steps] == pytest.approx([1e-2 * (1 - k / 6) for k in range(6)])
