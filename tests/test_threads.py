import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketllm import threads
from pocketllm.threads import Governor, Sample, choose, env_defaults, fair_share, others

ROOT = Path(__file__).resolve().parents[1]


# ---- the choice: a pure function of the cores, the load and the user's setting ---------------
def test_alone_a_run_takes_every_core():
    assert choose(2) == 2
    assert choose(16, [0.01] * 50) == 16     # daemons: a 16-core machine stays 16 cores


def test_beside_cpu_bound_jobs_the_cores_are_shared_equally():
    assert choose(2, [2.0]) == 1             # the other job took every core: half each
    assert choose(2, [1.0]) == 1
    assert choose(16, [16.0]) == 8
    assert choose(16, [5.0, 5.0, 6.0]) == 4
    assert fair_share(16, [16.0]) == (8.0, 1)


def test_light_load_keeps_only_what_it_uses():
    assert choose(2, [0.3]) == 2             # an idle server, a shell: no reason to halve a run
    assert fair_share(2, [0.3]) == (pytest.approx(1.7), 0)
    # a job held to 3 threads uses 3 of 16 cores: the run takes the other 13, not 8
    assert choose(16, [3.0]) == 13
    # water-filling: 0.5 and 1.0 are below the equal share, 8 and 8 above it
    assert fair_share(16, [8.0, 0.5, 1.0, 8.0]) == (pytest.approx(14.5 / 3), 2)


def test_at_least_one_thread_at_most_the_cores():
    assert choose(2, [2.0] * 5) == 1
    assert choose(2, [0.9, 0.9, 0.9]) == 1
    assert choose(4, []) == 4


def test_the_users_count_wins():
    assert choose(2, [2.0, 2.0], requested=2) == 2
    assert choose(16, requested=3) == 3


def test_env_defaults_respect_what_the_user_set():
    assert env_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"}
    assert env_defaults({"OMP_WAIT_POLICY": "ACTIVE"}) == {}  # the user's policy, whole
    assert env_defaults({"GOMP_SPINCOUNT": "0"}) == {}
    assert env_defaults({threads.SWITCH: "0"}) == {}


def test_env_defaults_are_not_set_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "torch" in sys.modules
    assert threads.set_env_defaults() == {}  # too late for OpenMP: nothing half-applied
    assert "OMP_WAIT_POLICY" not in os.environ


# ---- reading the machine's load ----------------------------------------------------------------
def _stat(utime: int, stime: int, comm: str = "python") -> str:
    # /proc/PID/stat: pid (comm) state ppid ... utime (field 14) stime (field 15) ...
    return f"1 ({comm}) R 1 1 1 0 -1 4194304 10 0 0 0 {utime} {stime} 0 0 20 0 3 0 100\n"


def test_sample_reads_each_process_cpu_time(tmp_path):
    tick = threads._TICK
    for pid, text in {"7": _stat(2 * tick, tick), "8": _stat(tick, 0, comm="a ) (b")}.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(text)
    (tmp_path / "9").mkdir()              # gone before its stat was read
    (tmp_path / "self").mkdir()           # not a process id
    assert threads.sample(str(tmp_path)).cpu == {7: 3.0, 8: 1.0}


def test_sample_of_this_machine_sees_this_process():
    s = threads.sample()
    assert os.getpid() in s.cpu and s.cpu[os.getpid()] > 0


def test_others_is_each_other_process_use_between_two_samples():
    before = Sample(10.0, {1: 0.0, 2: 0.0, 3: 0.0, 4: 5.0, 6: 1.0})
    after = Sample(12.0, {1: 2.0,    # 1 core
                          2: 0.2,    # 0.1 core
                          3: 4.0,    # this process: not counted
                          4: 5.4,    # 0.2 core
                          5: 9.0,    # started in between: the next interval's
                          6: 1.0})   # idle
    assert sorted(others(before, after, self_pid=3)) == pytest.approx([0.1, 0.2, 1.0])
    assert others(after, after, self_pid=3) == []


# ---- the process's choice, kept up to date ------------------------------------------------------
class FakeMachine:
    """Samples of a machine where another process (pid 100) uses `use` cores; a clock moved
    by hand."""

    def __init__(self):
        self.now, self.use, self.cpu = 0.0, 0.0, 0.0

    def advance(self, dt: float) -> None:
        self.now += dt
        self.cpu += self.use * dt

    def sample(self) -> Sample:
        return Sample(self.now, {100: self.cpu})


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_governor_shares_with_a_job_that_comes_and_goes(restore_threads):
    m, log = FakeMachine(), []
    g = Governor(4, log.append, sampler=m.sample, clock=lambda: m.now)
    m.advance(0.2)
    assert g.tick(force=True) == 4 == torch.get_num_threads()   # alone
    m.use = 4.0                           # a job started on every core
    m.advance(1.0)
    assert g.tick() == 4                  # not before RETUNE_S: the load is not read again
    m.advance(threads.RETUNE_S)
    assert g.tick() == 2 == torch.get_num_threads()   # another job: half the cores
    m.use = 0.0
    m.advance(threads.RETUNE_S)
    assert g.tick() == 4                  # it ended: every core again
    assert [line.split(" (")[0] for line in log] == [
        "threads: 4 of 4 cores", "threads: 2 of 4 cores", "threads: 4 of 4 cores"]


def test_configure_honours_the_user(monkeypatch, restore_threads):
    assert threads.configure(3) == 3 and threads._governor is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads.configure(0, auto=True)
    assert threads._governor is None      # OMP_NUM_THREADS: torch's count is the user's
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv(threads.SWITCH, "0")
    threads.configure(0, auto=True)
    assert threads._governor is None
    monkeypatch.delenv(threads.SWITCH)
    threads.configure(0, auto=False)      # a library caller: its threads are its own
    assert threads._governor is None
    threads.retune()                      # a no-op then


# ---- the CLI, as a fresh process: the settings reach OpenMP ------------------------------------
def _eval(*extra: str, env: dict | None = None) -> str:
    cmd = [sys.executable, "-m", "pocketllm.cli", "eval", "--model", "tiny-llama", "--data",
           "examples/personal", "--split", "test", "--max-batches", "1", *extra]
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", threads.SWITCH)}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env={
        **base, "PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE", **(env or {})})
    return r.stderr


def test_cli_defaults_reach_openmp_and_the_choice_is_printed():
    err = _eval()
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", err)
    if spin is None:
        pytest.skip("torch's OpenMP is not GNU's (no GOMP_SPINCOUNT displayed)")
    assert spin.group(1) == "300000"      # idle threads spin briefly, then sleep
    assert re.search(rf"^threads: \d+ of {threads.cores()} cores", err, re.M)


def test_cli_leaves_the_users_settings_alone():
    err = _eval("--threads", "1", env={"OMP_WAIT_POLICY": "ACTIVE"})
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", err)
    if spin is None:
        pytest.skip("torch's OpenMP is not GNU's (no GOMP_SPINCOUNT displayed)")
    assert int(spin.group(1)) > 0
    assert "threads:" not in err
