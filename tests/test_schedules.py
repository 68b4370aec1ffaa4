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
