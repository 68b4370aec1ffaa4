"""`pocketllm bench accuracy`: every (run, seed) trains on its own budget, the valid-picked
adapter is scored once, the outputs say so, and a second call resumes instead of rerunning."""

import csv

import pytest

from pocketllm.cli import main
from pocketllm.protocol import parse_runs
from tests.data.test_tasks import write_task

SENTENCES = ["a charming journey .", "dull and lifeless .", "a gem of a film .",
             "a waste of time .", "warm and funny .", "painfully slow ."]


def _sst2(tmp_path):
    recs = [{"sentence": f"{s} {i}", "label": str((j + 1) % 2)}
            for i in range(4) for j, s in enumerate(SENTENCES)]
    return write_task(tmp_path / "sst2", "sst2", recs)


def test_the_protocol_runs_scores_once_and_resumes(tmp_path, capsys):
    data, out = _sst2(tmp_path), tmp_path / "acc"
    argv = ["bench", "accuracy", "--model", "tiny-llama", "--task", "sst2", "--data", str(data),
            "--k", "2", "--seeds", "1", "2", "--budget-minutes", "0.02", "--steps-per-eval", "2",
            "--eval-examples", "8", "--max-seq-length", "32", "--jobs", "2",
            "--runs", "zero-shot", "zo=--method zo-sgd --iters 4 --batch-size 2",
            "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "accuracy.csv")))
    assert [(r["label"], r["seed"]) for r in rows] == [("zero-shot", "1"), ("zero-shot", "2"),
                                                       ("zo", "1"), ("zo", "2")]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    # the trained runs ran under the budget, with --keep-best, and were scored on best/
    for seed in (1, 2):
        run = out / "zo" / f"seed{seed}"
        cfg = (run / "config.yaml").read_text()
        assert "time_budget: 0.02" in cfg and "keep_best: true" in cfg and "threads: 1" in cfg
        log = (run / "protocol.log").read_text()
        assert f"--adapter-path {run / 'best'}" in log
    table = (out / "accuracy.md").read_text()
    assert "| zo |" in table and "| zero-shot |" in table and (out / "accuracy.png").exists()
    # run again: nothing is retrained, the same table comes back
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 runs (4 done before)" in capsys.readouterr().out
    assert list(csv.DictReader(open(out / "accuracy.csv"))) == rows


def test_run_specs():
    assert parse_runs(["zero-shot", "zo-sgd", "q4=--method prge --queries 4"]) == {
        "zero-shot": [], "zo-sgd": ["--method", "zo-sgd"],
        "q4": ["--method", "prge", "--queries", "4"]}
    for bad in (["a", "a"], ["zero-shot=--iters 3"], ["=--method x"], ["a/b"]):
        with pytest.raises(SystemExit):
            parse_runs(bad)
