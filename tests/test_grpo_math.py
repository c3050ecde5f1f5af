"""DanceGRPO's arithmetic against closed forms: group advantages and the SDE step.

The advantages are checked on a group worked by hand and against the formula
written out independently; the SDE step's mean and width against the algebra of
the rectified flow (``x0 = x - t v``), and its log-probability against
``torch.distributions.Normal``; a rollout with a velocity model given in closed
form must record, for every step, the log-density the recomputation of the
training step (``GRPO._means``) gives, so the PPO ratio starts at exactly 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from model.dit import TextConditioning
from pipelines.align.grpo import (
    GRPO,
    GradientMonitor,
    gradient_noise,
    gradient_signal,
    group_advantages,
    select_candidates,
)
from pipelines.align.sde import (
    gaussian_logprob,
    guided_velocities,
    sde_rollout,
    step_mean,
    step_std,
)

# -- group advantages --------------------------------------------------------------


def test_advantages_of_a_group_worked_by_hand():
    # Head 0 spreads 1..4 (mean 2.5, population std sqrt(1.25)); head 1 is flat.
    rewards = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])
    z = 1.5 / math.sqrt(1.25)  # 1.3416...
    adv = group_advantages(rewards, (1.0, 0.5), clip=5.0)
    expected = torch.tensor([-z, -z / 3, z / 3, z])
    assert torch.allclose(adv, expected, atol=1e-6)  # the flat head adds 0, not NaN
    clipped = group_advantages(rewards, (1.0, 0.5), clip=1.0)
    assert torch.allclose(clipped, torch.tensor([-1.0, -z / 3, z / 3, 1.0]), atol=1e-6)
    # Weights scale each head's normalised reward; a second head adds its own part.
    rewards[:, 1] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # the opposite order
    assert torch.allclose(group_advantages(rewards, (1.0, 1.0), 9.0), torch.zeros(4), atol=1e-6)
    adv = group_advantages(rewards, (1.0, 0.25), 9.0)
    assert torch.allclose(adv, 0.75 * expected, atol=1e-6)


def test_advantages_match_the_formula_and_ignore_reward_scale():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(8, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1])
    weights = (0.5, 1.0, 2.0)
    mean = rewards.mean(0)
    std = ((rewards - mean) ** 2).mean(0).sqrt()  # population std, as DanceGRPO
    formula = ((rewards - mean) / std * torch.tensor(weights)).sum(1)
    adv = group_advantages(rewards, weights, clip=100.0)
    assert torch.allclose(adv, formula, atol=1e-5)
    assert abs(float(adv.sum())) < 1e-4  # a group's advantages sum to zero
    # An offset or a positive scale of any head's reward changes nothing.
    moved = rewards * torch.tensor([3.0, 0.01, 50.0]) + torch.tensor([7.0, -2.0, 0.5])
    assert torch.allclose(group_advantages(moved, weights, 100.0), adv, atol=1e-4)
    # The best candidate on every head gets the largest advantage.
    rewards[5] = rewards.max(0).values + 1.0
    assert int(group_advantages(rewards, weights, 100.0).argmax()) == 5


def test_best_and_worst_candidates():
    adv = torch.tensor([0.1, -2.0, 1.5, 0.0, -0.3, 0.9])
    assert select_candidates(adv, 2) == [1, 2, 4, 5]
    assert select_candidates(adv, 1) == [1, 2]
    assert select_candidates(adv, 0) == list(range(6))


# -- the SDE step ------------------------------------------------------------------


def _state(b: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(b, 2, 3, 2, 2, generator=gen)
    audio = torch.randn(b, 4, 8, generator=gen)
    return video, audio, gen


def test_gradient_noise_of_three_gradients_worked_by_hand():
    grads = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    f = gradient_noise(grads, groups=4)
    # Dot products of the pairs: 0, 1, 1; the mean (2/3, 2/3); squared deviations
    # 5/9 + 5/9 + 2/9 over K - 1 = 2.
    assert f["signal"] == pytest.approx(2 / 3)
    assert f["signal_se"] == pytest.approx(1 / 3)  # std of (0, 1, 1) / sqrt(3)
    assert f["trace"] == pytest.approx(2 / 3)
    assert f["noise_scale"] == pytest.approx(4.0)  # 4 groups * (2/3) / (2/3)
    assert f["cos"] == pytest.approx(math.sqrt(2) / 3)
    assert f["grad_norm"] == pytest.approx((2 + math.sqrt(2)) / 3)
    with pytest.raises(ValueError, match="at least 3"):
        gradient_noise(grads[:2], groups=4)


def test_gradient_noise_recovers_a_known_signal_and_finds_none_in_pure_noise():
    gen = torch.Generator().manual_seed(0)
    p, k, sigma = 2000, 40, 0.5
    mean = torch.full((p,), 0.1)  # |G|^2 = 20; tr(S) = p * sigma^2 = 500
    f = gradient_noise([mean + sigma * torch.randn(p, generator=gen) for _ in range(k)], 16)
    assert f["signal"] == pytest.approx(20.0, rel=0.25)
    assert f["trace"] == pytest.approx(500.0, rel=0.1)
    assert f["noise_scale"] == pytest.approx(16 * 500 / 20, rel=0.35)
    noise = gradient_noise([sigma * torch.randn(p, generator=gen) for _ in range(k)], 16)
    assert abs(noise["signal"]) < 3 * noise["signal_se"]
    assert noise["noise_scale"] > 20 * f["noise_scale"]


def test_gradient_monitor_reads_each_rollouts_first_update_against_the_last():
    w = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    monitor = GradientMonitor([w, frozen], updates_per_rollout=2)
    w.grad = torch.tensor([3.0, 4.0])
    assert monitor(0) == {"grad_sq": 25.0}  # the first rollout: nothing to compare with
    w.grad = torch.tensor([100.0, 100.0])
    assert monitor(1) == {}  # the second update of that rollout
    w.grad = torch.tensor([1.0, -2.0])
    assert monitor(2) == {"grad_sq": 5.0, "grad_dot_previous": 3.0 - 8.0}
    w.grad = None
    assert monitor(4) == {}  # no gradient this step: nothing logged
    other = torch.nn.Parameter(torch.zeros(1))
    monitor = GradientMonitor([w, other], updates_per_rollout=1)
    w.grad, other.grad = torch.tensor([1.0, 1.0]), None  # a weight unused this step: zeros
    assert monitor(0) == {"grad_sq": 2.0}
    w.grad, other.grad = torch.tensor([2.0, 0.0]), torch.tensor([5.0])
    assert monitor(1) == {"grad_sq": 29.0, "grad_dot_previous": 2.0}


def test_gradient_signal_from_logged_rows_worked_by_hand():
    rows = [
        {"step": 2, "grad_sq": 10.0},  # the first rollout
        {"step": 4, "grad_sq": 12.0, "grad_dot_previous": 1.0},
        {"step": 6, "loss": 0.0},
        {"step": 8, "grad_sq": 8.0, "grad_dot_previous": 3.0},
    ]
    got = gradient_signal(rows)
    # Mean dot 2 over mean squared length 10; the dots' std sqrt(2), over sqrt(2) rows.
    assert got["rows"] == 2
    assert got["signal_share"] == pytest.approx(0.2)
    assert got["signal_share_se"] == pytest.approx(1.0 / 10.0)
    assert "warning" not in got
    one = gradient_signal([{"grad_sq": 10.0, "grad_dot_previous": 0.1}])
    assert one["signal_share"] == pytest.approx(0.01) and one["signal_share_se"] is None
    assert "warning" not in one  # one row is too few to say it
    low = gradient_signal([{"grad_sq": 10.0, "grad_dot_previous": d} for d in (0.0, 0.1, 0.2)])
    assert low["signal_share"] == pytest.approx(0.01)
    assert "1.0% +- 0.6% signal" in low["warning"] and "rlhf.batch_size" in low["warning"]
    assert gradient_signal([{"grad_sq": 1.0}]) == {"rows": 0}


def test_step_mean_and_width_follow_the_flow_algebra():
    x, _, gen = _state()
    v = torch.randn(x.shape, generator=gen)
    t, t_next = 0.7, 0.45
    dt = t_next - t
    # eta = 0 is the Euler step of the ODE, with no width.
    assert torch.allclose(step_mean(x, v, t, t_next, 0.0), x + dt * v)
    assert step_std(t, t_next, 0.0) == 0.0
    # eta > 0: with x0 = x - t v, the score -(x - (1 - t) x0) / t^2 is -(x + (1 - t) v) / t,
    # so the mean moves by dt v plus the Langevin correction 0.5 eta^2 dt (x + (1 - t) v) / t.
    eta = 0.6
    closed = x + dt * v + 0.5 * eta**2 * dt * (x + (1.0 - t) * v) / t
    assert torch.allclose(step_mean(x, v, t, t_next, eta), closed, atol=1e-6)
    assert step_std(t, t_next, eta) == pytest.approx(eta * math.sqrt(t - t_next))


def test_logprob_is_the_element_mean_of_the_gaussian_density():
    video, audio, gen = _state()
    mean_v, mean_a = (
        torch.randn(video.shape, generator=gen),
        torch.randn(audio.shape, generator=gen),
    )
    std = 0.37
    normal = torch.distributions.Normal
    both = torch.cat(
        [
            normal(mean_v, std).log_prob(video).flatten(1),
            normal(mean_a, std).log_prob(audio).flatten(1),
        ],
        dim=1,
    )  # (B, elements of both branches)
    got = gaussian_logprob(video, audio, mean_v, mean_a, std)
    assert got.shape == (3,)
    assert torch.allclose(got, both.mean(1), atol=1e-5)
    # Per-row widths (the batched training recomputation passes a (B,) tensor).
    widths = torch.tensor([0.2, 0.5, 1.3])
    per_row = torch.stack(
        [
            torch.cat(
                [
                    normal(mean_v[i], widths[i]).log_prob(video[i]).flatten(),
                    normal(mean_a[i], widths[i]).log_prob(audio[i]).flatten(),
                ]
            ).mean()
            for i in range(3)
        ]
    )
    assert torch.allclose(
        gaussian_logprob(video, audio, mean_v, mean_a, widths), per_row, atol=1e-5
    )
    # The density peaks at the mean.
    assert bool((gaussian_logprob(mean_v, mean_a, mean_v, mean_a, std) > got).all())


class LinearVelocity:
    """v = A x + b t with known A, b: the SDE step's mean is known in closed form."""

    def __call__(self, video, audio, t, text, *rest):
        tv = t.view(-1, *([1] * (video.dim() - 1)))
        ta = t.view(-1, *([1] * (audio.dim() - 1)))
        return -0.8 * video + 0.3 * tv, 0.5 * audio - 0.2 * ta


def _text(b: int) -> TextConditioning:
    return TextConditioning(torch.ones(b, 1, 4), torch.ones(b, 1, dtype=torch.bool))


def test_rollout_steps_are_the_stated_gaussians_and_the_recomputation_agrees():
    video, audio, _ = _state(b=2, seed=5)
    times, eta = [1.0, 0.75, 0.4, 0.0], 0.7
    traj = sde_rollout(
        LinearVelocity(), video, audio, _text(2), _text(2), times, eta, 1.0,
        torch.Generator().manual_seed(9),
    )  # fmt: skip
    assert traj.logprobs.shape == (3, 2) and len(traj.videos) == 4
    model = LinearVelocity()
    for j, (t, t_next) in enumerate(zip(times, times[1:], strict=False)):
        x_v, x_a = traj.videos[j], traj.audios[j]
        tt = torch.full((2,), t)
        v_v, v_a = model(x_v, x_a, tt, None)
        std = eta * math.sqrt(t - t_next)
        mean_v = step_mean(x_v, v_v, t, t_next, eta)
        mean_a = step_mean(x_a, v_a, t, t_next, eta)
        normal = torch.distributions.Normal
        density = torch.cat(
            [
                normal(mean_v, std).log_prob(traj.videos[j + 1]).flatten(1),
                normal(mean_a, std).log_prob(traj.audios[j + 1]).flatten(1),
            ],
            dim=1,
        ).mean(1)
        assert torch.allclose(traj.logprobs[j], density, atol=1e-5)
        # What the training step recomputes from (state, time) rows gives the same
        # log-probability: the PPO ratio of an unchanged policy is exactly 1.
        rmean_v, rmean_a, widths = GRPO._means(
            x_v, x_a, v_v, v_a, tt, torch.full((2,), t_next), eta
        )
        again = gaussian_logprob(traj.videos[j + 1], traj.audios[j + 1], rmean_v, rmean_a, widths)
        assert torch.allclose(torch.exp(again - traj.logprobs[j]), torch.ones(2), atol=1e-5)


def test_step_noise_has_the_stated_width():
    """Many draws of one step from one state: their mean and spread are the
    Gaussian's (20000 draws: the standard error of the mean is std / 141)."""
    n = 20000
    video = torch.full((n, 1, 1, 1, 1), 0.4)
    audio = torch.full((n, 1, 1), -0.3)
    t, t_next, eta = 0.8, 0.5, 0.9
    traj = sde_rollout(
        LinearVelocity(), video, audio, _text(n), _text(n), [t, t_next], eta, 1.0,
        torch.Generator().manual_seed(1),
    )  # fmt: skip
    v_v, v_a = LinearVelocity()(video[:1], audio[:1], torch.tensor([t]), None)
    std = eta * math.sqrt(t - t_next)
    for drawn, x, v in ((traj.videos[1], video[:1], v_v), (traj.audios[1], audio[:1], v_a)):
        mean = float(step_mean(x, v, t, t_next, eta).flatten()[0])
        assert abs(float(drawn.mean()) - mean) < 4 * std / math.sqrt(n)
        assert float(drawn.std()) == pytest.approx(std, rel=0.03)


def test_guided_velocities_mix_prompt_and_null_rows():
    """Text guidance in the GRPO forward: v_null + s (v_text - v_null), rows kept apart."""

    def model(video, audio, t, text):
        p = text.tokens[:, 0, 0]  # 0 for the null rows
        return video + p.view(-1, 1, 1, 1, 1), audio - p.view(-1, 1, 1)

    video, audio, _ = _state(b=2)
    text = TextConditioning(
        torch.tensor([1.0, 4.0]).view(2, 1, 1).repeat(1, 1, 4), torch.ones(2, 1, dtype=torch.bool)
    )
    null = TextConditioning(torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool))
    t = torch.tensor([0.5, 0.5])
    v, a = guided_velocities(model, video, audio, t, text, null, 3.0)
    p = torch.tensor([1.0, 4.0])
    assert torch.allclose(v, video + 3.0 * p.view(-1, 1, 1, 1, 1))
    assert torch.allclose(a, audio - 3.0 * p.view(-1, 1, 1))
    v1, _ = guided_velocities(model, video, audio, t, text, null, 1.0)
    assert torch.allclose(v1, video + p.view(-1, 1, 1, 1, 1))
