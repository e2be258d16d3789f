"""Facts about the evaluation helpers."""
import pytest
import torch

from kdpo_lab import evaluation


def test_memory_timeline_sees_the_peak_of_live_tensors():
    def f():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = torch.ones(512, 1024)   # 2 MiB, while a is alive: peak 6 MiB
        del a
        return b.sum()
    _, timeline, _ = evaluation.memory_timeline(f)
    assert timeline["allocated_mb"].max() == pytest.approx(6.0, abs=0.01)


def test_memory_timeline_refuses_a_function_that_allocates_nothing():
    with pytest.raises(ValueError):
        evaluation.memory_timeline(lambda: 1 + 1)
