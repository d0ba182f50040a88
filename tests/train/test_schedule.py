import dataclasses
import math

import pytest

from slmforge.config import TrainConfig
from slmforge.train.schedule import lr_at

BASE = TrainConfig(max_steps=100, warmup_steps=10, lr_peak=1e-3, lr_min_ratio=0.1, decay_fraction=0.2)


def cfg(**kw):
    return dataclasses.replace(BASE, **kw)


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_warmup_is_linear_and_reaches_peak(schedule):
    c = cfg(schedule=schedule)
    assert lr_at(0, c) == pytest.approx(1e-4)
    assert lr_at(4, c) == pytest.approx(5e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)


@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_stable_then_decay_to_floor(shape):
    c = cfg(decay_shape=shape)
    assert all(lr_at(s, c) == pytest.approx(1e-3) for s in range(10, 80))  # stable phase
    decay = [lr_at(s, c) for s in range(80, 100)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotone decay
    assert decay[0] < 1e-3
    assert lr_at(99, c) == pytest.approx(1e-4)  # last step reaches the floor


def test_wsd_decay_shapes_differ_at_midpoint():
    mid = 89  # progress p = 10/20 = 0.5
    lin, sq, cos = (lr_at(mid, cfg(decay_shape=s)) for s in ("linear", "sqrt", "cosine"))
    floor, peak = 1e-4, 1e-3
    assert lin == pytest.approx(floor + (peak - floor) * 0.5)
    assert sq == pytest.approx(floor + (peak - floor) * (1 - math.sqrt(0.5)))
    assert cos == pytest.approx(floor + (peak - floor) * 0.5)
    assert sq < lin


def test_cosine_midpoint_and_end():
    c = cfg(schedule="cosine")
    assert lr_at(99, c) == pytest.approx(1e-4)
    mid = lr_at(10 + 45 - 1, c)  # progress 0.5 of the 90 post-warmup steps
    assert mid == pytest.approx(1e-4 + 0.9e-3 * 0.5)


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match="cosine, wsd"):
        lr_at(0, cfg(schedule="wds"))
