"""The weight EMA (``model.ema``, used by ``model.fit`` and ``pipelines.train.loop``).

Expectations are hand-computed numbers and limits, never the code's own update rule
run again: the warm-up decays at known steps, a two-step trajectory worked out on
paper, convergence to a constant parameter, and the lag after a late jump. The
trajectories are imposed on the parameter through ``model.fit._train`` itself: the
loss function writes the step's value into the parameter and returns a loss with
zero gradient, so AdamW (zero moments, no weight decay) leaves it there.
"""

from __future__ import annotations

import pytest
import torch

from model.ema import ema_decay_at, ema_update
from model.fit import FitReport, FitSettings, _train


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


def _imposed(values: list[float], decay: float, start: float = 0.0) -> tuple[float, list[float]]:
    """Run model.fit._train on one scalar whose value after step k is values[k].

    Returns the module's final value (the EMA swapped in when decay > 0) and the
    values the loss function saw before each step (the previous step's result)."""
    param = torch.nn.Parameter(torch.tensor([start]))
    module = torch.nn.Module()
    module.p = param
    seen: list[float] = []

    def loss_fn(step: int):
        seen.append(float(param.detach()))
        with torch.no_grad():
            param.fill_(values[step])
        return (param * 0.0).sum(), {}

    settings = FitSettings(log_every=10_000, grad_clip=1.0)
    _train(module, [param], len(values), 1e-2, loss_fn, "p", FitReport(), settings,
           None, ema_decay=decay)  # fmt: skip
    return float(param.detach()), seen


def test_fit_imposed_trajectory_stays_put_without_ema():
    final, seen = _imposed([1.0, 3.0, -2.0], decay=0.0)
    assert seen == [0.0, 1.0, 3.0] and final == -2.0  # zero gradient: AdamW moves nothing


def test_fit_ema_two_steps_by_hand():
    final, _ = _imposed([1.0, 3.0], decay=0.9)
    assert final == pytest.approx(28.8 / 11, abs=1e-6)


def test_fit_ema_converges_to_a_constant_parameter():
    final, _ = _imposed([2.5] * 300, decay=0.95, start=-4.0)
    # The start's weight after 300 steps is below 0.95**280: gone.
    assert final == pytest.approx(2.5, abs=1e-5)


def test_fit_ema_lags_a_late_jump_by_one_minus_decay():
    # 200 steps at 0 (the average settles at 0), then one step at 1: the average
    # moves by (1 - 0.9) of the jump, not onto the last value.
    final, _ = _imposed([0.0] * 200 + [1.0], decay=0.9, start=5.0)
    assert final == pytest.approx(0.1, abs=1e-6)


def test_fit_ema_warmup_forgets_the_initial_weights_fast():
    # Step 0 keeps a tenth of the start whatever the decay (0.999 would keep 99.9%).
    final, _ = _imposed([0.0], decay=0.999, start=10.0)
    assert final == pytest.approx(1.0, abs=1e-6)
