"""The weight EMA (``model.ema``, which the trainer, ``pipelines.train.loop``, updates
after every optimizer step and swaps in for the stage's final weights).

Expectations are hand-computed numbers and limits, never the code's own update rule
run again: the warm-up decays at known steps, a two-step trajectory worked out on
paper, convergence to a constant parameter, the lag after a late jump, and several
tensors updated in one call each moving by its own rule. That the trainer's final
checkpoint holds the EMA, not the last step's weights, is checked on a real run in
tests/test_learning_signal.py.
"""

from __future__ import annotations

import pytest
import torch

from model.ema import ema_decay_at, ema_update


def test_warmup_decays_by_hand():
    # min(decay, (1 + k) / (10 + k)): 1/10, 2/11, 9/18 at steps 0, 1, 8.
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(8, 0.999) == pytest.approx(0.5)
    assert ema_decay_at(8, 0.3) == pytest.approx(0.3)  # the cap binds
    assert ema_decay_at(10_000, 0.998) == pytest.approx(0.998)


def test_update_two_steps_by_hand():
    avg = torch.zeros(3)
    ema_update([avg], [torch.ones(3)], decay=0.9, step=0)
    # decay 0.1: 0.1 * 0 + 0.9 * 1
    torch.testing.assert_close(avg, torch.full((3,), 0.9))
    ema_update([avg], [torch.full((3,), 3.0)], decay=0.9, step=1)
    # decay 2/11: (2/11) * 0.9 + (9/11) * 3 = 28.8 / 11
    torch.testing.assert_close(avg, torch.full((3,), 28.8 / 11))


def _average_of(values: list[float], decay: float, start: float = 0.0) -> float:
    """The average of one scalar parameter whose value after optimizer step k is
    values[k], updated after every step as the trainer does (pipelines/train/loop.py)."""
    average = torch.tensor([start])
    for step, value in enumerate(values):
        ema_update([average], [torch.tensor([value])], decay, step)
    return float(average)


def test_ema_converges_to_a_constant_parameter():
    final = _average_of([2.5] * 300, decay=0.95, start=-4.0)
    # The start's weight after 300 steps is below 0.95**280: gone.
    assert final == pytest.approx(2.5, abs=1e-5)


def test_ema_lags_a_late_jump_by_one_minus_decay():
    # 200 steps at 0 (the average settles at 0), then one step at 1: the average
    # moves by (1 - 0.9) of the jump, not onto the last value.
    final = _average_of([0.0] * 200 + [1.0], decay=0.9, start=5.0)
    assert final == pytest.approx(0.1, abs=1e-6)


def test_ema_warmup_forgets_the_initial_weights_fast():
    # Step 0 keeps a tenth of the start whatever the decay (0.999 would keep 99.9%).
    final = _average_of([0.0], decay=0.999, start=10.0)
    assert final == pytest.approx(1.0, abs=1e-6)


def test_update_moves_each_tensor_toward_its_own_parameter():
    # Several tensors in one call (the trainer passes every DiT tensor at once), of
    # different shapes: each pair moves by the same weight, 1 - 2/11 = 9/11 at step 1.
    averages = [torch.zeros(2, 3), torch.full((4,), 11.0)]
    params = [torch.full((2, 3), 11.0), torch.zeros(4)]
    ema_update(averages, params, decay=0.99, step=1)
    torch.testing.assert_close(averages[0], torch.full((2, 3), 9.0))
    torch.testing.assert_close(averages[1], torch.full((4,), 2.0))
    assert float(params[0][0, 0]) == 11.0 and float(params[1][0]) == 0.0  # untouched
    with pytest.raises(RuntimeError):  # lists that do not pair up
        ema_update(averages, params[:1], decay=0.99, step=1)
