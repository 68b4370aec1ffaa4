"""Threads on a machine that other work shares: how many a run computes with, and how the idle
ones wait.

torch's defaults assume the machine is the run's alone: one OpenMP thread per core, and threads
that spin at every barrier (GNU OpenMP: about 3 ms) before sleeping. Beside another CPU-bound
job that is the worst case. Every op ends at a barrier that waits for the thread the scheduler
has just put aside for the other job, while its partner burns the cycles the other job needed
(a forward beside one other `pocketllm eval` took 7x its time alone, where losing half the
cores explains 2x; benchmarks/results/under_load.md). What the CLI does instead:

- `OMP_WAIT_POLICY=PASSIVE` with `GOMP_SPINCOUNT=300000` (`set_env_defaults`, before torch is
  loaded: OpenMP reads them once): a thread with nothing to do spins briefly, then sleeps and
  leaves its core to whoever can use it (sleeping at once cost a run alone 1.27x its step).
- a fair share of the cores (`fair_share`): what light background work (a shell, an idle
  server) leaves, divided equally among the CPU-bound jobs, this run included, so that the
  threads of all of them add up to the cores instead of twice as many. It is chosen again
  every few seconds between steps and batches (`retune`), so two runs started at different
  times settle on splitting the machine (the first would otherwise keep every core it took
  when it was alone).

A user's choice wins: `--threads N` fixes the count, and so does `OMP_NUM_THREADS`; a set
`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is kept (neither is set then);
`POCKETLLM_AUTO_THREADS=0` restores torch's defaults (both).

Imports nothing of pocketllm, and torch only once it is loaded: the CLI calls
`set_env_defaults` before anything imports torch.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

# the one place the toolkit sets them: spin about libgomp's own default count at a barrier, then
# sleep (measured: the same time beside another job as sleeping at once, and a run alone keeps
# its speed: plain PASSIVE made it 1.27x slower; benchmarks/results/under_load.md)
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"}
SWITCH = "POCKETLLM_AUTO_THREADS"               # "0": torch's defaults, as before
RETUNE_S = 3.0     # seconds between two choices
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def enabled(environ=os.environ) -> bool:
    return environ.get(SWITCH, "1") != "0"


def env_defaults(environ) -> dict[str, str]:
    """The `ENV_DEFAULTS` that `environ` does not set already (none with the switch off)."""
    if not enabled(environ):
        return {}
    if any(k in environ for k in ENV_DEFAULTS):  # the user's wait policy, whole
        return {}
    return dict(ENV_DEFAULTS)


def set_env_defaults() -> dict[str, str]:
    """Set `env_defaults` in this process's environment, if torch is not loaded yet (OpenMP
    reads them when it starts: later they would change nothing here, only in child processes).
    Returns what it set."""
    if "torch" in sys.modules:
        return {}
    new = env_defaults(os.environ)
    os.environ.update(new)
    return new


def fair_share(cores: int, others: list[float]) -> tuple[float, int]:
    """This run's max-min fair share of `cores` beside other processes using `others` cores'
    worth of CPU each: a process using less than an equal share keeps what it uses (an idle
    server, a shell), the rest (the CPU-bound jobs) split what is left equally with this run.
    Returns (the share in cores, how many other jobs share it)."""
    rest, jobs = float(cores), sorted(u for u in others if u > 0)
    while jobs and jobs[0] < rest / (1 + len(jobs)):  # water-filling, lightest first
        rest -= jobs.pop(0)
    return rest / (1 + len(jobs)), len(jobs)


def choose(cores: int, others: list[float] = (), requested: int = 0) -> int:
    """Threads for a run: `requested` if given (> 0), else its fair share of `cores` beside
    processes using `others` cores each (`fair_share`), rounded; at least 1, at most `cores`."""
    if requested > 0:
        return requested
    return max(1, min(cores, math.floor(fair_share(cores, list(others))[0] + 0.5)))


# ---- what the rest of the machine is doing --------------------------------------------------
@dataclass
class Sample:
    """CPU seconds used so far by each process (pid -> s), read at `t` (time.monotonic)."""
    t: float
    cpu: dict[int, float]


def sample(proc: str = "/proc") -> Sample:
    """Every visible process's CPU time (user + system, all its threads) from /proc/PID/stat."""
    cpu = {}
    with os.scandir(proc) as it:
        for e in it:
            if not e.name.isdigit():
                continue
            try:
                with open(f"{proc}/{e.name}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
                cpu[int(e.name)] = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not ours to read
    return Sample(time.monotonic(), cpu)


def others(before: Sample, after: Sample, self_pid: int) -> list[float]:
    """Cores' worth of CPU each other process used between two samples (not `self_pid`;
    processes that started or ended in between are left for the next interval)."""
    dt = after.t - before.t
    if dt <= 0:
        return []
    return [(s - before.cpu[pid]) / dt for pid, s in after.cpu.items()
            if pid != self_pid and pid in before.cpu and s > before.cpu[pid]]


def cores() -> int:
    """The cores this process may run on (its affinity, e.g. under taskset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---- the process's choice -------------------------------------------------------------------
class Governor:
    """The fair share, chosen again every RETUNE_S seconds by `tick` (called between steps)."""

    def __init__(self, n_cores: int, log=None, sampler=sample, clock=time.monotonic):
        self.n_cores, self.log, self.pid = n_cores, log, os.getpid()
        self.sampler, self.clock = sampler, clock  # (a test's stand-ins)
        self.last = sampler()
        self.threads = 0

    def tick(self, force: bool = False) -> int:
        """Choose again if RETUNE_S has passed since the last choice (`force`: now); returns the
        threads in use."""
        if not force and self.clock() - self.last.t < RETUNE_S:
            return self.threads
        cur = self.sampler()
        use = others(self.last, cur, self.pid)
        self.last = cur
        n = choose(self.n_cores, use)
        if n != self.threads:
            import torch
            torch.set_num_threads(n)
            if self.log:
                share, jobs = fair_share(self.n_cores, use)
                self.log(f"threads: {n} of {self.n_cores} cores (fair share {share:.1f} beside "
                         f"{jobs} other CPU-bound job{'s' * (jobs != 1)} and "
                         f"{sum(use):.1f} cores of load in all)")
            self.threads = n
        return n


_governor: Governor | None = None


def configure(requested: int = 0, auto: bool = True, log=None) -> int:
    """Set this process's torch threads: `requested` (> 0) as given; else, where `auto` (the
    process is the CLI's, not a library caller's), torch's default is not the user's
    (OMP_NUM_THREADS) and the toolkit's choice is on, the fair share, printed with `log` and
    kept up to date by `retune`. Returns the threads in use."""
    global _governor
    import torch
    _governor = None
    if requested > 0:
        torch.set_num_threads(requested)
    elif auto and enabled() and "OMP_NUM_THREADS" not in os.environ:
        _governor = Governor(cores(), log)
        time.sleep(0.2)  # an interval to measure the machine's load over
        _governor.tick(force=True)
    return torch.get_num_threads()


def retune() -> None:
    """Choose this process's threads again if RETUNE_S has passed (a no-op unless `configure`
    chose them). Call between steps or batches, from the thread that computes: OpenMP's
    thread count is per calling thread."""
    if _governor is not None:
        _governor.tick()
