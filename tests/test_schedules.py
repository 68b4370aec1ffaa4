import pytest

from pocketllm.config import TrainArgs
from pocketllm.methods.zo import ZOConfig
from pocketllm.schedules import eps_at, lr_at, scheduled


def test_shapes_start_and_end():
    assert scheduled("constant", 1.0, 0.0, 7, 10) == 1.0
    assert scheduled("linear", 1.0, 0.0, 0, 10) == 1.0
    assert scheduled("linear", 1.0, 0.0, 5, 10) == pytest.approx(0.5)
    assert scheduled("cosine", 1.0, 0.1, 0, 10) == 1.0
    assert scheduled("cosine", 1.0, 0.1, 5, 10) == pytest.approx(0.55)
    assert scheduled("cosine", 1.0, 0.1, 10, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="linear"):
        scheduled("step", 1.0, 0.0, 0, 10)


def test_warmup_and_args():
    a = TrainArgs(learning_rate=1e-3, lr_schedule="linear", lr_warmup=4, iters=14)
    assert [lr_at(a, s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(a, 9) == pytest.approx(5e-4)
    e = ZOConfig(eps=1e-2, eps_schedule="linear")
    assert eps_at(e, 0, 10) == 1e-2 and eps_at(e, 10, 10) == pytest.approx(1e-3)  # final eps/10
    assert eps_at(ZOConfig(eps=1e-2), 5, 10) == 1e-2


def test_a_time_budget_ends_the_schedule_where_it_stops_the_run():
    from pocketllm.schedules import budget_spent
    a = TrainArgs(learning_rate=1e-2, lr_schedule="linear", iters=5000, time_budget=10.0)
    assert budget_spent(a, 0.0) == 0.0 and budget_spent(a, 300.0) == pytest.approx(0.5)
    assert budget_spent(a, 900.0) == 1.0  # past the budget: the schedule's end, not beyond
    assert budget_spent(TrainArgs(time_budget=0.0), 300.0) == 0.0  # no budget: steps alone
    # half the budget spent at step 10 of 5000: the schedule is half-way, not at 0.2%
    assert lr_at(a, 10, budget_spent(a, 300.0)) == pytest.approx(5e-3)
    # whichever limit comes first: steps beyond the time spent still count
    assert lr_at(a, 4000, budget_spent(a, 60.0)) == pytest.approx(2e-3)
    assert lr_at(TrainArgs(learning_rate=1e-2, lr_schedule="constant"), 10, 0.9) == 1e-2
    e = ZOConfig(eps=1e-2, eps_schedule="linear")
    assert eps_at(e, 0, 10, 1.0) == pytest.approx(1e-3)
