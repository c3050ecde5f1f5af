"""DanceGRPO as published, the reward model's floor and RL on any corpus, on small
closed-form models: deterministic and fast (no trained pipeline).

- the per-head advantages and the clipped loss per head against values worked by hand;
- several optimiser steps per rollout: the ratio is 1 on the first update of a
  rollout and differs from 1 on the second (the clip acts), and a run resumed inside
  a rollout trains on exactly the rows an uninterrupted one does;
- the floor refuses a reward model that orders held-out pairs against the rater,
  naming the head and the figure;
- prompts from a caption list that is not the synthetic world, whose rater heads that
  need that world are skipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.media import AVClip
from pipelines.align.config import HEADS, RewardConfig, RLHFStageConfig
from pipelines.align.grpo import (
    GRPO,
    batch_advantages,
    clipped_objective,
    group_advantages,
    head_advantages,
)
from pipelines.align.prompts import caption_prompts, split_prompts
from pipelines.align.rater import WORLD_HEADS, rate_clip, skipped_heads
from pipelines.align.reward import (
    NoPreferencesError,
    RewardFloorError,
    check_agreement_floor,
    train_reward_model,
)
from pipelines.align.stages import RolloutSchedule, reward_trends
from pipelines.align.toy_policy import head0_reward, toy_grpo

Z = 1.5 / math.sqrt(1.25)  # the z-score of 1 and 4 in a group 1, 2, 3, 4


# -- per-head advantages and the clipped loss per head -----------------------------


def test_per_head_advantages_and_clipped_loss_worked_by_hand():
    # Head 0 orders the group 1..4, head 1 the opposite way: the summed advantage is 0
    # for every candidate, so one clip of the sum would give no loss at all.
    rewards = torch.tensor([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]])
    adv = head_advantages(rewards, clip=5.0)
    a0 = torch.tensor([-Z, -Z / 3, Z / 3, Z])
    assert torch.allclose(adv, torch.stack([a0, -a0], 1), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, (1.0, 1.0), 5.0), torch.zeros(4), atol=1e-6)
    # Each head is clipped on its own: |z| 1.34 -> 1, |z| 0.45 kept.
    clipped = head_advantages(rewards, clip=1.0)
    assert torch.allclose(clipped[:, 0], torch.tensor([-1.0, -Z / 3, Z / 3, 1.0]), atol=1e-6)
    # At ratio 1 the loss is -mean(A) per head: 0 for a group-normalised head.
    loss, per_head = clipped_objective(torch.ones(4), adv, (1.0, 1.0), 1e-3)
    assert abs(float(loss)) < 1e-6
    # Ratio 1.01 everywhere, clip 1e-3: max(-A r, -A clip(r)) takes r = 1.01 where
    # A < 0 and 1.001 where A > 0 (the pessimistic bound), so per head
    # mean(z 1.01, z/3 1.01, -z/3 1.001, -z 1.001) = (4z/3) 0.009 / 4 = 0.003 z.
    loss, per_head = clipped_objective(torch.full((4,), 1.01), adv, (1.0, 1.0), 1e-3)
    assert torch.allclose(per_head, torch.full((2,), 0.003 * Z), atol=1e-6)
    assert float(loss) == pytest.approx(0.006 * Z, abs=1e-6)
    # Weights scale each head's loss; a head with weight 0 adds nothing.
    loss, _ = clipped_objective(torch.full((4,), 1.01), adv, (1.0, 0.0), 1e-3)
    assert float(loss) == pytest.approx(0.003 * Z, abs=1e-6)
    # Per-row ratios, one head: rows (A, r) = (-z, 0.99), (-z/3, 1), (z/3, 1.0005),
    # (z, 1.02); clip 1e-3 gives max(z 0.99, z 0.999) = 0.999 z, z/3, -z/3 1.0005,
    # max(-1.02 z, -1.001 z) = -1.001 z.
    ratio = torch.tensor([0.99, 1.0, 1.0005, 1.02])
    loss, _ = clipped_objective(ratio, adv[:, :1], (1.0,), 1e-3)
    by_hand = (0.999 * Z + Z / 3 - 1.0005 * Z / 3 - 1.001 * Z) / 4
    assert float(loss) == pytest.approx(by_hand, abs=1e-7)


def test_batch_advantages_scale_each_head_by_its_spread_over_the_whole_batch():
    # Group A differs by 0.001 on head 0 (the rater's noise), group B by 2.
    a = torch.tensor([[1.000, 0.0], [1.001, 1.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 5.0]])
    # DanceGRPO's group std makes both groups' advantages +-1 on head 0.
    by_group = batch_advantages([a, b], 5.0, "group")
    assert torch.allclose(by_group[0][:, 0], torch.tensor([-1.0, 1.0]), atol=1e-3)
    # Batch: centred rewards on head 0 are +-0.0005 and +-1, so the scale is
    # sqrt((2 * 0.0005**2 + 2 * 1) / 4); head 1: +-0.5 and +-1, sqrt((0.5 + 2) / 4).
    got = batch_advantages([a, b], 5.0, "batch")
    s0 = math.sqrt((2 * 0.0005**2 + 2.0) / 4)
    s1 = math.sqrt(2.5 / 4)
    assert torch.allclose(got[0][:, 0], torch.tensor([-0.0005, 0.0005]) / s0, atol=1e-6)
    assert torch.allclose(got[1][:, 0], torch.tensor([-1.0, 1.0]) / s0, atol=1e-6)
    assert torch.allclose(got[0][:, 1], torch.tensor([-0.5, 0.5]) / s1, atol=1e-6)
    # The clip still acts per head, and a batch without spread gives zeros.
    assert float(batch_advantages([a, b], 1.0, "batch")[1].abs().max()) == 1.0
    flat = batch_advantages([torch.ones(2, 2), torch.zeros(2, 2)], 5.0, "batch")
    assert all(float(x.abs().max()) == 0.0 for x in flat)
    with pytest.raises(ValueError, match="advantage_norm"):
        RLHFStageConfig(advantage_norm="global").validate()


def test_rollout_groups_share_their_noise_unless_told_otherwise():
    def first_latents(**settings):
        policy, _ = _policy(**settings)
        return policy.rollout(0, torch.Generator().manual_seed(3)).videos[0]  # (G, ...)

    shared = first_latents()
    assert all(torch.equal(shared[0], shared[c]) for c in range(1, 4))
    own = first_latents(shared_noise=False)
    assert not any(torch.equal(own[0], own[c]) for c in range(1, 4))


@pytest.mark.parametrize("shared", [True, False])
def test_groups_sampled_in_one_batch_come_out_as_each_group_sampled_alone(shared):
    policy, _ = _policy(shared_noise=shared)
    together = policy.rollout_groups([1, 0], [torch.Generator().manual_seed(s) for s in (5, 6)])
    for k, (prompt, seed) in enumerate(((1, 5), (0, 6))):
        alone = policy.rollout(prompt, torch.Generator().manual_seed(seed))
        rows = together.rows(4 * k, 4 * (k + 1))
        for a, b in zip(rows.videos + rows.audios, alone.videos + alone.audios, strict=True):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(rows.logprobs, alone.logprobs)
    # A rollout batch split over several network batches (memory) draws the same rows.
    split, _ = _policy(shared_noise=shared, rollout_groups_per_batch=1)
    a = policy.collect([0, 1], torch.Generator().manual_seed(9))
    b = split.collect([0, 1], torch.Generator().manual_seed(9))
    for key in ("x_v", "next_a", "old", "adv"):
        torch.testing.assert_close(a.rows[key], b.rows[key])
    with pytest.raises(ValueError, match="rollout_groups_per_batch"):
        RLHFStageConfig(rollout_groups_per_batch=-1).validate()


def test_a_loss_in_chunks_has_the_whole_losss_value_gradient_and_metrics():
    # Rows of an update that do not fit one forward are accumulated chunk by chunk:
    # the same loss, gradient and metrics as one forward over them all, KL included.
    import copy

    def update(chunk: int):
        policy, _ = _policy(loss_rows_per_chunk=chunk, kl_weight=0.5)
        policy.reference = copy.deepcopy(policy.module)
        with torch.no_grad():  # a reference the policy has moved away from
            for p in policy.reference.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        rollout = policy.collect([0, 1], torch.Generator().manual_seed(4))
        rollout.rows["old"] = rollout.rows["old"] - 0.002  # ratios off 1: the clip acts
        loss, metrics, _ = policy.loss(rollout, None)
        loss.backward()
        grads = [p.grad.clone() for p in policy.module.parameters()]
        return float(loss.detach()), grads, metrics

    whole, grads, metrics = update(0)  # 16 rows: 2 groups of 4, 2 of 4 steps each
    assert metrics["clip_fraction"] > 0 and metrics["kl"] > 0
    for chunk in (3, 5):  # chunks of unequal sizes
        got, got_grads, got_metrics = update(chunk)
        assert got == pytest.approx(whole, rel=1e-5, abs=1e-7)
        for a, b in zip(got_grads, grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert got_metrics == pytest.approx(metrics, rel=1e-5, abs=1e-7)
    # Under DDP the gradients are all-reduced once, on the last chunk's backward.
    from contextlib import contextmanager

    from pipelines.align.grpo import ChunkedLoss

    synced = []

    class Wrapped:
        @contextmanager
        def no_sync(self):
            synced.append(False)
            yield

    w = torch.ones(1, requires_grad=True)
    chunked = ChunkedLoss([lambda: w.sum(), lambda: 2 * w.sum(), lambda: 3 * w.sum()],
                          Wrapped(), lambda: synced.append(True))  # fmt: skip
    chunked.backward()
    assert synced == [False, False, True] and float(w.grad) == 6.0
    assert float(chunked.detach()) == 6.0
    policy, _ = _policy(loss_rows_per_chunk=4)
    loss, _, _ = policy.loss(policy.collect([0], torch.Generator().manual_seed(4)), None)
    with pytest.raises(RuntimeError, match="backward"):
        loss.detach()
    with pytest.raises(ValueError, match="loss_rows_per_chunk"):
        RLHFStageConfig(loss_rows_per_chunk=-1).validate()


def test_group_spread_is_each_weighted_heads_std_within_its_group_averaged():
    from pipelines.align.grpo import group_spread

    a = torch.tensor([[0.0, 1.0, 5.0, 0, 0], [2.0, 1.0, 5.0, 0, 0]])  # stds 1.414, 0, 0
    b = torch.tensor([[1.0, 0.0, 0.0, 0, 0], [1.0, 4.0, 2.0, 0, 0]])  # stds 0, 2.828, 1.414
    got = group_spread([a, b], (1.0, 1.0, 0.0, 0.0, 0.0))
    assert got == pytest.approx({"spread_sync": 2**0.5 / 2, "spread_adherence": 2**0.5})
    policy, _ = _policy()  # the rollout's metrics carry it for the heads trained on
    rollout = policy.collect([0, 1], torch.Generator().manual_seed(0))
    assert rollout.metrics["spread_sync"] > 0 and "spread_motion" not in rollout.metrics


# -- several optimiser steps per rollout -------------------------------------------


def _policy(**settings) -> tuple[GRPO, RLHFStageConfig]:
    return toy_grpo(**settings)


def _gen(step: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + step)


def _updates(schedule, opt, steps: range, record: list) -> None:
    for step in steps:
        loss, metrics, _ = schedule([0, 1], _gen(step), step)
        record.append((float(loss.detach()), metrics))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_ratio_leaves_1_on_the_second_update_of_a_rollout_and_resume_is_exact(tmp_path):
    policy, s = _policy(updates_per_rollout=2, steps=4, checkpoint_every=1)
    schedule = RolloutSchedule(policy, s, str(tmp_path / "a"), rank=0)
    opt = torch.optim.SGD(policy.module.parameters(), lr=0.5)
    got: list = []
    _updates(schedule, opt, range(4), got)
    dev = [m["ratio_dev_max"] for _, m in got]
    # Updates 0 and 2 open a rollout: the policy that drew it, ratio 1 to rounding.
    assert dev[0] < 1e-5 and dev[2] < 1e-5, dev
    # Updates 1 and 3 reuse it after an optimiser step: the ratio moved and the clip acts.
    assert dev[1] > 10 * s.clip_range and dev[3] > 10 * s.clip_range, dev
    assert got[1][1]["clip_fraction"] > 0 and got[0][1]["clip_fraction"] == 0.0
    # The two updates of a rollout train on disjoint halves of its rows.
    rollout = schedule.current
    halves = [set(rollout.order[u::2].tolist()) for u in range(2)]
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == len(rollout.order)
    # Each sample drew its own training steps (a permutation per sample, not per prompt):
    # 2 of 4 steps per candidate; the 4 candidates of the first prompt do not all
    # train on the same pair.
    t = rollout.rows["t"].view(-1, 2)[:4]  # rows in collection order: candidate by candidate
    assert len({tuple(sorted(r.tolist())) for r in t}) > 1

    # A run killed after step 2 (its checkpoint sits inside the rollout of step 2)
    # resumes with the weights of that checkpoint and reads the rollout back.
    policy_b, s_b = _policy(updates_per_rollout=2, steps=4, checkpoint_every=1)
    schedule_b = RolloutSchedule(policy_b, s_b, str(tmp_path / "b"), rank=0)
    opt_b = torch.optim.SGD(policy_b.module.parameters(), lr=0.5)
    before: list = []
    _updates(schedule_b, opt_b, range(3), before)
    resumed = RolloutSchedule(policy_b, s_b, str(tmp_path / "b"), rank=0)  # fresh process
    after: list = []
    _updates(resumed, opt_b, range(3, 4), after)
    losses = [x for x, _ in before + after]
    assert losses == [x for x, _ in got], (losses, [x for x, _ in got])


def _mean_reward(policy: GRPO) -> float:
    """The toy reward (head 0: the video's mean) of 4 fresh groups per prompt."""
    return sum(head0_reward(policy)) / 2


@pytest.mark.parametrize(
    ("norm", "window", "start"),
    [("group", 0, -1), ("batch", 0, -1), ("group", 1, -1), ("group", 1, 0)],
)
def test_dance_grpo_raises_the_reward_it_is_given(norm, window, start):
    # The toy policy can move its video's mean through the prompt's bias; 40 steps of
    # DanceGRPO (shared-noise groups of 4, 2 updates a rollout) should raise head 0's
    # reward (weighted 1 against head 1's 0.5 for the opposite). Measured: +0.35 with
    # group advantages, +0.41 with batch ones; with the advantages' sign flipped, -0.36.
    # (Own-noise groups, 4 seeds: -0.06 to +0.18: the initial noise, which the policy
    # does not choose, then moves the reward more than its steps do.) With an SDE window
    # of one step: +0.57 +- 0.03 over 6 seeds (+0.53 +- 0.02 fixed at the first step),
    # against +0.33 +- 0.01 with every step noisy (python -m bench.grpo_toy).
    policy, s = _policy(updates_per_rollout=2, steps=40, checkpoint_every=1000,
                        advantage_norm=norm, sde_window=window,
                        sde_window_start=start)  # fmt: skip
    schedule = RolloutSchedule(policy, s, "/nonexistent-never-written", rank=0)
    opt = torch.optim.Adam(policy.module.parameters(), lr=0.01)
    before = _mean_reward(policy)
    for step in range(40):
        loss, _, _ = schedule([0, 1], _gen(step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _mean_reward(policy) - before > 0.2


def test_an_sde_window_draws_noise_only_in_its_steps_and_trains_only_on_them():
    policy, s = _policy()
    # One noisy step of four: the candidates of a shared-noise group stay one sample
    # (the ODE) until it, differ after it, and only it has a log-probability.
    traj = policy.rollout_groups([0], [torch.Generator().manual_seed(3)], [0.0, 0.3, 0.0, 0.0])
    for k, video in enumerate(traj.videos):
        same = all(torch.equal(video[0], video[c]) for c in range(1, 4))
        assert same == (k <= 1), k
    assert torch.count_nonzero(traj.logprobs[[0, 2, 3]]) == 0
    assert torch.count_nonzero(traj.logprobs[1]) == 4
    # The stage's window: its start drawn per rollout batch, its steps the only rows.
    policy, s = _policy(sde_window=2)
    starts = {policy.sde_steps(_gen(k))[0] for k in range(12)}
    assert len(starts) > 1 and starts <= {0, 1, 2}
    for k in range(3):
        window = policy.sde_steps(_gen(k))  # what collect draws first from the same seed
        rows = policy.collect([0, 1], _gen(k)).rows
        assert sorted(set(rows["t"].tolist())) == sorted(policy.times[j] for j in window)
        assert len(rows["t"]) == 2 * 4 * 2  # 2 prompts x 4 candidates x the window's 2 steps
    with pytest.raises(ValueError, match="sde_window"):
        RLHFStageConfig(sde_window=11).validate()
    # A fixed start: every rollout batch's window is the same steps.
    policy, s = _policy(sde_window=1, sde_window_start=0)
    for k in range(3):
        rows = policy.collect([0, 1], _gen(k)).rows
        assert set(rows["t"].tolist()) == {policy.times[0]}
    for bad in ({"sde_window_start": 0}, {"sde_window": 2, "sde_window_start": 9},
                {"sde_window": 2, "sde_window_start": -2}):  # fmt: skip
        with pytest.raises(ValueError, match="sde_window_start"):
            RLHFStageConfig(**bad).validate()


def test_one_update_per_rollout_keeps_the_ratio_at_1():
    policy, s = _policy(updates_per_rollout=1, steps=2, checkpoint_every=1)
    schedule = RolloutSchedule(policy, s, "/nonexistent-never-written", rank=0)
    opt = torch.optim.SGD(policy.module.parameters(), lr=0.5)
    got: list = []
    _updates(schedule, opt, range(2), got)
    assert all(m["ratio_dev_max"] < 1e-5 for _, m in got)


def test_kl_to_the_sft_model_is_on_by_default_only_with_a_learned_reward():
    assert RLHFStageConfig().kl_coefficient() == pytest.approx(0.04)
    assert RLHFStageConfig(reward_source="rater").kl_coefficient() == 0.0
    assert RLHFStageConfig(kl_weight=0.0).kl_coefficient() == 0.0


def test_reward_hacking_monitor_flags_a_reward_rising_while_the_rater_falls():
    rows = [
        {"step": k, "reward_monitored": 0.1 * k, "rater": 0.5 - 0.05 * k,
         "reward_sync": 0.1 * k, "rater_sync": 0.5 - 0.05 * k,
         "reward_adherence": 0.1 * k, "rater_adherence": 0.2 + 0.01 * k}
        for k in range(1, 6)
    ]  # fmt: skip
    got = reward_trends(rows, ["sync", "adherence"])
    assert got["diverging"] is True and got["diverging_heads"] == ["sync"]
    assert got["reward_model_slope"] == pytest.approx(0.1)
    assert got["rater_slope"] == pytest.approx(-0.05)
    assert got["heads"]["adherence"]["diverging"] is False
    assert reward_trends(rows[:1], ["sync"])["diverging"] is None  # one point: no trend


# -- the floor ----------------------------------------------------------------------


def _row(group: str, c: int, split: str, visual: float) -> dict:
    row = {
        "group_id": group, "candidate": c, "prompt": "p", "references": "{}", "seed": 0,
        "noise_seed": c, "clip_uri": "", "latent_uri": "", "rater_id": "r", "split": split,
    }  # fmt: skip
    for h in HEADS:
        row[f"score_{h}"] = visual if h == "visual" else None
        row[f"rank_{h}"] = None
    return row


def _preferences(val_sign: float):
    """Groups of 4 latents rated on ``visual`` by their mean brightness; the held-out
    groups are rated by ``val_sign`` times it (-1: the opposite of what was taught)."""
    gen = torch.Generator().manual_seed(0)
    rows, videos = [], []
    for g in range(12):
        split = "val" if g >= 9 else "train"
        for c in range(4):
            v = torch.randn(2, 2, 4, 4, generator=gen) + 0.5 * c - 0.75
            m = float(v.mean())
            rows.append(_row(f"g{g}", c, split, m * (val_sign if split == "val" else 1.0)))
            videos.append(v)
    n = len(rows)
    inputs = {
        "video": torch.stack(videos), "audio": torch.zeros(n, 2, 4),
        "tokens": torch.ones(n, 1, 4), "mask": torch.ones(n, 1, dtype=torch.bool),
    }  # fmt: skip
    return rows, inputs


DIMS = {"video_channels": 2, "audio_channels": 2, "text_dim": 4, "audio_per_video": 2}
WEIGHTS = (0.0, 0.0, 0.0, 1.0, 0.0)  # visual only


def test_floor_refuses_a_reward_model_that_disagrees_with_the_rater_on_held_out_pairs():
    cfg = RewardConfig(steps=60, width=8, batch_pairs=32, lr=1e-2)
    rows, inputs = _preferences(val_sign=-1.0)
    _, bad = train_reward_model(rows, inputs, cfg, DIMS)
    figure = bad["val_agreement"]["visual"]["agreement"]
    assert figure < 0.3, bad["val_agreement"]
    with pytest.raises(RewardFloorError, match=rf"visual: held-out agreement {figure:.3f}"):
        check_agreement_floor(bad, WEIGHTS, 0.6)
    check_agreement_floor(bad, (0.0,) * len(HEADS), 0.6)  # a head not optimised: no check
    check_agreement_floor(bad, WEIGHTS, 0.0)  # floor off
    rows, inputs = _preferences(val_sign=1.0)
    _, good = train_reward_model(rows, inputs, cfg, DIMS)
    assert good["val_agreement"]["visual"]["agreement"] >= 0.8, good["val_agreement"]
    check_agreement_floor(good, WEIGHTS, 0.6)
    # A head it optimises with no held-out pairs is unknown, and refused too.
    with pytest.raises(RewardFloorError, match="sync: no held-out pairs"):
        check_agreement_floor(good, (1.0, 0.0, 0.0, 1.0, 0.0), 0.6)
    # ...and one measured on too few pairs to judge.
    pairs = good["val_agreement"]["visual"]["pairs"]
    with pytest.raises(RewardFloorError, match=rf"visual: .* on only {pairs} pairs.*"
                       rf"min_val_pairs = {pairs + 1}"):  # fmt: skip
        check_agreement_floor(good, WEIGHTS, 0.6, min_pairs=pairs + 1)
    check_agreement_floor(good, WEIGHTS, 0.6, min_pairs=pairs)
    check_agreement_floor(good, WEIGHTS, 0.0, min_pairs=pairs + 1)  # floor off


def test_preferences_without_any_pair_say_what_to_change():
    rows, inputs = _preferences(val_sign=1.0)
    for r in rows:
        r["score_visual"] = 0.5
    with pytest.raises(NoPreferencesError, match=r"min_margin = 0.05.*visual 0.000"):
        train_reward_model(rows, inputs, RewardConfig(steps=1), DIMS)


# -- RL on any corpus ---------------------------------------------------------------

REAL_CAPTIONS = [
    'A man in a grey coat walks a dog along a beach at dusk "come on, boy"',
    "Two children ride bicycles down a leafy street",
    "A chef slices onions on a wooden board",
    "Rain falls on a city street at night",
    "A woman plays the piano in a bright room",
    "Two children ride bicycles down a leafy street",
]


def test_prompts_come_from_any_captions_and_world_heads_are_skipped_on_real_ones():
    prompts = caption_prompts(REAL_CAPTIONS)
    assert len(prompts) == 5 and "A man in a grey coat walks a dog along a beach at dusk" in prompts
    train, held = split_prompts(prompts, RLHFStageConfig().prompts)
    assert len(train) == 4 and len(held) == 1
    skip, why = skipped_heads(train + held)
    assert skip == WORLD_HEADS == ("sync", "adherence", "motion")
    assert "5 of 5 prompt(s)" in why
    # The synthetic world, colour words or not, keeps every head.
    world = ["a red circle bounces on a gray floor", "a circle bounces on a gray floor"]
    assert skipped_heads(caption_prompts(world)) == ((), "")
    # The rater leaves the skipped heads unrated (no pairs, no reward) and rates the rest.
    rng = np.random.default_rng(0)
    clip = AVClip(
        frames=rng.integers(0, 255, (9, 64, 64, 3), dtype=np.uint8), fps=16.0,
        audio=(0.1 * rng.standard_normal((1, 9000))).astype(np.float32), sample_rate=16000,
    )  # fmt: skip
    scores = rate_clip(prompts[0], clip, skip=skip)
    assert all(scores[h] is None for h in WORLD_HEADS)
    assert scores["visual"] is not None and scores["audio"] is not None
