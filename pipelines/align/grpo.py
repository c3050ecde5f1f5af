"""DanceGRPO on the flow sampler: group rollouts, per-head advantages, a clipped loss per head.

A rollout batch, for each prompt of the worker's batch:

1. **Rollout** (no gradient): ``G`` candidates from one shared initial noise
   (``shared_noise = false``: each its own, as Flow-GRPO's groups), sampled
   with the SDE of :mod:`pipelines.align.sde` (noise level ``eta``) and the text
   guidance the model is used with; the log-probability of every step is kept.
2. **Reward**: the learned reward model scores the final latents per head
   (``reward_source="rater"`` decodes and asks the probes instead; an ablation only).
   With the learned reward the rater also scores the same candidates (the
   reward-hacking monitor: both are logged, and the stage's report flags a reward
   model score that rises while the rater's falls).
3. **Advantages, per head**: each head's rewards normalised within the group
   (``(r - mean) / std``; a head on which the group does not differ gives 0), or with
   ``advantage_norm = "batch"`` centred in the group and divided by the head's spread
   over the whole batch; clipped to ``adv_clip_max``. Optionally only the best and
   worst ``k`` candidates by weighted advantage are trained on (best-and-worst-of-N).
4. **Rows**: each candidate trains on its own random ``timestep_fraction`` of the
   sampling steps (a permutation per sample, as DanceGRPO); the (candidate, step) rows
   of the batch are shuffled and split over ``updates_per_rollout`` optimiser steps.

An update, on its share of the rows: one batched forward of the policy (or chunks of
``loss_rows_per_chunk`` rows, accumulated, DDP synchronising on the last) gives
``r = exp(logp_new - logp_old)`` of the step the sampler took, and the loss is a
clipped PPO objective per head,

    L_h = mean_rows max(-A_h r, -A_h clip(r, 1 - c, 1 + c)),   L = sum_h w_h L_h

(DanceGRPO's multi-reward loss: each reward has its own clipped objective, rather
than one clip of the summed advantage, so a head whose candidate already moved far
stops pulling while the others still pull). The first update of a rollout sees the
policy that drew it (``r = 1``); the later ones see the policy the earlier updates
moved, so the ratio and the clip act. Plus ``kl_coefficient()`` times the KL from the
frozen parent policy's step to this one's (both Gaussians of the same width:
``|mean - mean_ref|^2 / 2 std^2`` per element), on by default with a learned reward.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, field

import torch

from model.dit import TextConditioning
from pipelines.align.config import HEADS
from pipelines.align.observer import decode_frames
from pipelines.align.sde import (
    Trajectory,
    gaussian_logprob,
    guided_velocities,
    sde_rollout,
    step_mean,
)
from pipelines.train.batches import pad_text

ROW_KEYS = ("x_v", "x_a", "next_v", "next_a", "t", "t_next", "old", "adv", "prompt")


def head_advantages(
    rewards: torch.Tensor, clip: float, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """(G, H) per-head advantages of one group's (G, H) rewards, each clipped to ``clip``.

    Centred within the group and divided by ``scale`` (H,) when given, else by the
    group's own std per head (DanceGRPO); a head with no spread gives 0."""
    mean = rewards.mean(0, keepdim=True)
    std = rewards.std(0, unbiased=False, keepdim=True) if scale is None else scale.view(1, -1)
    norm = torch.where(
        std > 1e-6, (rewards - mean) / std.clamp_min(1e-6), torch.zeros_like(rewards)
    )
    return norm.clamp(-clip, clip)


def batch_advantages(groups: list[torch.Tensor], clip: float, norm: str) -> list[torch.Tensor]:
    """Per-head advantages of a rollout batch's groups (each (G, H) rewards).

    ``norm = "group"``: each group by its own std (DanceGRPO). ``"batch"``: each group
    centred on its own mean, all divided by the head's std of those centred rewards
    over the whole batch, so a group whose candidates barely differ (differences at the
    rater's noise) gets small advantages instead of full-size ones.
    """
    if norm == "group":
        return [head_advantages(r, clip) for r in groups]
    centred = torch.cat([r - r.mean(0, keepdim=True) for r in groups])  # (N, H)
    scale = centred.pow(2).mean(0).sqrt()  # (H,)
    return [head_advantages(r, clip, scale) for r in groups]


def group_advantages(
    rewards: torch.Tensor, weights: tuple[float, ...], clip: float
) -> torch.Tensor:
    """(G,) weighted sum of the per-head advantages (what best-and-worst-of-N ranks by)."""
    w = torch.tensor(weights, dtype=rewards.dtype, device=rewards.device)
    return (head_advantages(rewards, clip) * w).sum(-1)


def clipped_objective(
    ratio: torch.Tensor,  # (R,) exp(logp_new - logp_old) per row
    adv: torch.Tensor,  # (R, H) per-head advantages of each row's candidate
    weights: tuple[float, ...],
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum of per-head clipped PPO losses, and the (H,) per-head losses."""
    r = ratio[:, None]
    unclipped = -adv * r
    clipped = -adv * torch.clamp(r, 1.0 - clip_range, 1.0 + clip_range)
    per_head = torch.maximum(unclipped, clipped).mean(0)  # (H,)
    w = torch.tensor(weights, dtype=per_head.dtype, device=per_head.device)
    return (per_head * w).sum(), per_head


def gradient_noise(grads: list[torch.Tensor], groups: int) -> dict[str, float]:
    """How much of one rollout batch's policy gradient is signal, from the gradients
    ``grads`` (K >= 3 flattened vectors) of K independent batches of ``groups`` groups.

    ``signal``: |G|^2 of the expected gradient, the mean dot product of two different
    batches' gradients (unbiased; can come out below 0 when noise swamps it), with
    ``signal_se`` the standard error of those dot products; ``trace``: tr(S), one
    batch's gradient variance; ``noise_scale``: ``groups * trace / signal``, the groups
    a batch needs to hold as much signal as noise (McCandlish et al. 2018), infinite
    when no signal shows; ``cos``: the mean cosine of two batches' gradients."""
    k = len(grads)
    if k < 3:
        raise ValueError("the gradient noise needs at least 3 batches' gradients")
    g = torch.stack([x.detach().flatten().double().cpu() for x in grads])  # (K, P)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    dots = torch.stack([g[i] @ g[j] for i, j in pairs])
    norms = g.norm(dim=1)
    signal = float(dots.mean())
    trace = float(((g - g.mean(0)) ** 2).sum() / (k - 1))
    cos = torch.stack([dots[n] / (norms[i] * norms[j]) for n, (i, j) in enumerate(pairs)])
    return {
        "grad_norm": float(norms.mean()),
        "signal": signal,
        "signal_se": float(dots.std() / math.sqrt(len(pairs))),
        "trace": trace,
        "noise_scale": groups * trace / signal if signal > 0 else math.inf,
        "cos": float(cos.mean()),
    }


def flat_gradient(params: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The gradients of ``params`` as one fp32 vector (a weight without one counts as
    zeros, so two steps' vectors line up), and whether they are shards (FSDP: this
    rank's parts only, so dot products need summing over ranks)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    sharded = any(hasattr(g, "to_local") for g in grads)
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    return torch.cat([g.detach().flatten().float() for g in local]), sharded


class GradientMonitor:
    """How much of a rollout batch's gradient is signal, measured as the stage trains.

    Called after each update's backward (``StageTask.after_backward``); on the first
    update of each rollout (ratio 1: the plain policy gradient of a fresh batch) it logs
    ``grad_sq`` (the gradient's squared length) and ``grad_dot_previous`` (its dot
    product with the previous rollout's first gradient). Two rollouts' batches are
    independent draws, so the mean dot product estimates the expected gradient's
    squared length |G|^2 and the mean squared length |G|^2 + tr(S):
    :func:`gradient_signal` turns the logged rows into the share of signal. (The
    weights move between the two by an update or two; prompts drawn in both batches
    count their own expected gradient as signal.)"""

    def __init__(self, params, updates_per_rollout: int):
        self.params = [p for p in params if p.requires_grad]
        self.every = max(1, updates_per_rollout)
        self.previous: torch.Tensor | None = None

    def __call__(self, step: int) -> dict[str, float]:
        if step % self.every:
            return {}
        if all(p.grad is None for p in self.params):
            return {}
        flat, sharded = flat_gradient(self.params)
        sums = torch.stack([flat @ flat, flat @ self.previous if self.previous is not None
                            else flat.new_zeros(())])  # fmt: skip
        if sharded and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        out = {"grad_sq": float(sums[0])}
        if self.previous is not None:
            out["grad_dot_previous"] = float(sums[1])
        self.previous = flat
        return out


# Below this share of signal a rollout batch's gradient is mostly noise (the report says so,
# once it has this many rows to say it from).
LOW_SIGNAL_SHARE = 0.05
MIN_SIGNAL_ROWS = 3


def gradient_signal(rows: list[dict]) -> dict:
    """The stage's gradient-noise figures from its logged rows (each a log window's
    means): ``signal_share``, mean dot product of consecutive rollouts' gradients over
    their mean squared length (the share of one batch's squared gradient that is the
    expected gradient), its standard error over the rows, and a ``warning`` when it
    stands below :data:`LOW_SIGNAL_SHARE` on :data:`MIN_SIGNAL_ROWS` rows or more."""
    pairs = [(r["grad_dot_previous"], r["grad_sq"]) for r in rows
             if "grad_dot_previous" in r and "grad_sq" in r]  # fmt: skip
    if not pairs:
        return {"rows": 0}
    dots = torch.tensor([d for d, _ in pairs], dtype=torch.float64)
    sq = statistics.fmean(q for _, q in pairs)
    share = float(dots.mean()) / sq if sq > 0 else 0.0
    se = float(dots.std()) / math.sqrt(len(pairs)) / sq if len(pairs) > 1 and sq > 0 else None
    out = {"rows": len(pairs), "signal_share": share, "signal_share_se": se}
    if share < LOW_SIGNAL_SHARE and len(pairs) >= MIN_SIGNAL_ROWS:
        out["warning"] = (
            f"a rollout batch's gradient is {share:.1%} +- {se:.1%} signal: the updates are mostly "
            "noise, which Adam turns into steps the size of the learning rate; more groups "
            "per step (rlhf.batch_size), a reward whose candidates differ more, or a lower "
            "rate with more steps (python -m bench.grpo_gradient_noise measures it)"
        )
    return out


def group_spread(groups: list[torch.Tensor], weights) -> dict[str, float]:
    """``spread_<head>``: the std of each weighted head's reward within a group, averaged
    over the batch's (G, H) groups. What the group-relative advantages are made of: a
    reward whose candidates of one group barely differ (or differ only by a rater's
    threshold noise) leaves the policy little to learn from."""
    std = torch.stack([g.float().std(0) for g in groups]).mean(0)
    return {f"spread_{h}": float(std[k]) for k, h in enumerate(HEADS) if weights[k] > 0}


def select_candidates(adv: torch.Tensor, k: int) -> list[int]:
    """Indices of the best and worst ``k`` candidates (all when ``k`` is 0)."""
    if k <= 0:
        return list(range(adv.shape[0]))
    order = torch.argsort(adv, descending=True).tolist()
    return sorted(order[:k] + order[-k:])


def rater_scores(
    pipeline,
    prompt: str,
    video,
    audio,
    frames: int,
    skip: tuple[str, ...] = (),
    pool=None,
    adherence_score: str = "colour_frames",
) -> torch.Tensor:
    """(G, H) rater scores of decoded candidates; NaN where a head does not apply.
    ``pool``: :func:`pipelines.align.rater.rater_pool` processes to rate in;
    ``adherence_score``: which rater score is the adherence head (as in the preference
    table, ``rlhf.preferences.adherence_score``)."""
    from pipelines.align.rater import preference_scores, rate_clips

    clips = [
        pipeline.decode_latents(video[c : c + 1], audio[c : c + 1], frames, seed=c)
        for c in range(video.shape[0])
    ]
    rated = rate_clips([prompt] * len(clips), clips, skip, pool)
    rated = [preference_scores(r, adherence_score) for r in rated]
    out = [[math.nan if s.get(h) is None else float(s[h]) for h in HEADS] for s in rated]
    return torch.tensor(out, dtype=torch.float32)


def rater_rewards(
    pipeline,
    prompt: str,
    video,
    audio,
    frames: int,
    skip=(),
    pool=None,
    adherence_score="colour_frames",
) -> torch.Tensor:
    """Rater scores as rewards: a head that does not apply gives 0 (no advantage)."""
    scores = rater_scores(pipeline, prompt, video, audio, frames, skip, pool, adherence_score)
    return torch.nan_to_num(scores, nan=0.0)


@dataclass
class Rollout:
    """One rollout batch kept for its updates: the training rows and how they are split."""

    step: int  # the loop step that drew it
    rows: dict[str, torch.Tensor]  # ROW_KEYS; adv is (R, H), the others (R, ...)
    order: torch.Tensor  # (R,) shuffled row indices; update u trains on order[u::parts]
    parts: int
    metrics: dict[str, float] = field(default_factory=dict)

    def part(self, u: int | None) -> dict[str, torch.Tensor]:
        if u is None:
            return self.rows
        idx = self.order[u :: self.parts].to(self.rows["old"].device)
        return {k: v[idx] for k, v in self.rows.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything as CPU tensors (safetensors), to resume inside a rollout."""
        out = {f"row.{k}": v.detach().cpu().contiguous() for k, v in self.rows.items()}
        out["order"] = self.order.cpu()
        out["step_parts"] = torch.tensor([self.step, self.parts])
        for k, v in self.metrics.items():
            out[f"metric.{k}"] = torch.tensor([v], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], device) -> Rollout:
        rows = {k[4:]: v.to(device) for k, v in t.items() if k.startswith("row.")}
        metrics = {k[7:]: float(v[0]) for k, v in t.items() if k.startswith("metric.")}
        step, parts = (int(x) for x in t["step_parts"])
        return cls(step, rows, t["order"], parts, metrics)


class ChunkedLoss:
    """A loss whose rows do not fit one forward, as gradient accumulation.

    Stands where the training loop expects the loss tensor: ``backward()`` runs each
    chunk's forward and backward in turn (activation memory is one chunk's; the
    gradient is the whole loss's, since each chunk returns its share of the mean),
    under the module's ``no_sync`` but for the last chunk, so DDP all-reduces once;
    ``detach()`` then gives the total. ``done`` is called after the last chunk (it
    fills the update's metrics, which need every chunk's ratios)."""

    def __init__(self, chunks: list, module, done):
        self.chunks, self.module, self.done = chunks, module, done
        self.value: torch.Tensor | None = None

    def backward(self) -> None:
        total = None
        no_sync = getattr(self.module, "no_sync", None)  # DDP's; absent on a bare module
        for k, run in enumerate(self.chunks):
            last = k == len(self.chunks) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss = run()
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.value = total
        self.done()

    def detach(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("a chunked loss has its value once backward() has run")
        return self.value


@dataclass
class GRPO:
    settings: object  # RLHFStageConfig
    module: torch.nn.Module  # the trained DiT (possibly DDP/FSDP wrapped)
    dit: torch.nn.Module  # the bare DiT (null text, shapes)
    reference: torch.nn.Module | None
    reward_model: torch.nn.Module
    pipeline: object
    tokens: torch.Tensor  # (P, L, D) prompt tokens
    mask: torch.Tensor  # (P, L)
    prompts: list[str]
    shapes: tuple
    times: list[float]
    device: torch.device
    weights: tuple[float, ...] = ()  # per-head loss weights (settings' by default)
    # Rater heads that do not apply to this corpus (they need the synthetic world).
    skip_heads: tuple[str, ...] = ()
    # Rate rollouts with the rater too (the reward-hacking monitor); learned reward only.
    monitor: bool = False
    # Processes the rater runs in (rlhf.rater_workers; None: in this process).
    rater_pool: object = None

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = tuple(self.settings.head_weights)

    def rollout(self, prompt_index: int, gen: torch.Generator) -> Trajectory:
        """One prompt's group of ``group_size`` candidates."""
        return self.rollout_groups([prompt_index], [gen])

    def rollout_groups(
        self, prompts: list[int], gens: list[torch.Generator], etas: list[float] | None = None
    ) -> Trajectory:
        """The groups of several prompts sampled in one batch, (P * G) rows in prompt
        order: each group draws its noises from its own generator, so it comes out as
        it would sampled alone, while the network sees one batch (a small DiT on a GPU
        is bound by launches, not arithmetic). ``etas``: a noise level per step (an SDE
        window, :meth:`sde_steps`); the settings' ``eta`` at every step by default."""
        s = self.settings
        g = s.group_size
        v_shape, a_shape, _ = self.shapes
        n = 1 if s.shared_noise else g  # initial noises a group
        videos, audios = [], []
        for gen in gens:
            videos.append(torch.randn(n, *v_shape[1:], generator=gen).expand(g, *v_shape[1:]))
            audios.append(torch.randn(n, *a_shape[1:], generator=gen).expand(g, *a_shape[1:]))
        text = self._texts([p for p in prompts for _ in range(g)])  # (P * G) rows
        null = self.dit.null_text_conditioning(g * len(prompts), self.device)
        was_training = self.module.training
        self.module.eval()
        traj = sde_rollout(
            self.module, torch.cat(videos).to(self.device), torch.cat(audios).to(self.device),
            text, null, self.times, s.eta if etas is None else etas, s.text_scale, list(gens),
        )  # fmt: skip
        self.module.train(was_training)
        return traj

    @torch.no_grad()
    def rewards(self, prompt_index: int, video, audio) -> torch.Tensor:
        if self.settings.reward_source == "rater":
            return rater_rewards(
                self.pipeline, self.prompts[prompt_index], video, audio, self.shapes[2],
                self.skip_heads, self.rater_pool, self.settings.preferences.adherence_score,
            ).to(self.device)  # fmt: skip
        if self.settings.reward_source == "judge":  # a JudgeReward: decodes and asks
            prompt = self.prompts[prompt_index]
            return self.reward_model.rewards(prompt, video, audio).to(self.device)
        g = video.shape[0]
        tokens = self.tokens[prompt_index : prompt_index + 1].expand(g, -1, -1)
        mask = self.mask[prompt_index : prompt_index + 1].expand(g, -1)
        if getattr(self.reward_model, "reads_frames", False):  # it sees decoded frames
            size = self.reward_model.observer_config.size
            frames = decode_frames(self.pipeline.video_vae, video, self.shapes[2], size)
            return self.reward_model(video, audio, tokens, mask, frames=frames).float()
        return self.reward_model(video, audio, tokens, mask).float()

    def sde_steps(self, gen: torch.Generator) -> list[int]:
        """The sampling steps that draw noise in a rollout batch: all of them, or with
        ``sde_window = k`` k consecutive ones starting at ``sde_window_start`` or, when
        that is -1, at a step drawn from ``gen``."""
        n_steps, k = len(self.times) - 1, self.settings.sde_window
        if k <= 0 or k >= n_steps:
            return list(range(n_steps))
        start = self.settings.sde_window_start
        if start < 0:
            start = int(torch.randint(0, n_steps - k + 1, (1,), generator=gen))
        return list(range(start, start + k))

    def collect(self, indices: list[int], gen: torch.Generator, step: int = 0, parts: int = 1):
        """Roll out, score and turn one batch of prompts into training rows (no gradient)."""
        s = self.settings
        n_steps = len(self.times) - 1
        n_train = max(1, round(s.timestep_fraction * n_steps))
        rows: dict[str, list] = {k: [] for k in ROW_KEYS}
        model_means, rater_means, trajs, group_rewards = [], [], [], []
        window = self.sde_steps(gen) if s.sde_window > 0 else None
        etas = None if window is None else [s.eta if j in window else 0.0 for j in range(n_steps)]
        # One generator a group, seeded from the step's: the batch's groups sample together.
        seeds = torch.randint(0, 2**62, (len(indices),), generator=gen).tolist()
        gens = [torch.Generator().manual_seed(x) for x in seeds]
        chunk = s.rollout_groups_per_batch or len(indices)
        batches = [
            self.rollout_groups(indices[i : i + chunk], gens[i : i + chunk], etas)
            for i in range(0, len(indices), chunk)
        ]
        for k, pi in enumerate(indices):
            j = k % chunk  # the group's rows in its batch
            traj = batches[k // chunk].rows(j * s.group_size, (j + 1) * s.group_size)
            final_v, final_a = traj.final
            rewards = self.rewards(pi, final_v, final_a)  # (G, H)
            model_means.append(rewards.mean(0).cpu())
            if self.monitor and s.reward_source != "rater":
                with torch.no_grad():
                    rated = rater_scores(
                        self.pipeline, self.prompts[pi], final_v, final_a, self.shapes[2],
                        self.skip_heads, self.rater_pool, s.preferences.adherence_score,
                    )  # fmt: skip
                rater_means.append(rated.nanmean(0))
            trajs.append(traj)
            group_rewards.append(rewards)
        advantages = batch_advantages(group_rewards, s.adv_clip_max, s.advantage_norm)
        for pi, traj, adv in zip(indices, trajs, advantages, strict=True):  # adv: (G, H)
            w = torch.tensor(self.weights, dtype=adv.dtype, device=adv.device)
            chosen = select_candidates((adv * w).sum(-1), s.best_worst_k)
            for c in chosen:
                # A permutation of the sampling steps per sample (DanceGRPO), not per
                # prompt; with an SDE window, the window's steps (the others drew no noise).
                steps = window or torch.randperm(n_steps, generator=gen)[:n_train].tolist()
                for j in steps:
                    rows["x_v"].append(traj.videos[j][c])
                    rows["x_a"].append(traj.audios[j][c])
                    rows["next_v"].append(traj.videos[j + 1][c])
                    rows["next_a"].append(traj.audios[j + 1][c])
                    rows["t"].append(torch.tensor(self.times[j]))
                    rows["t_next"].append(torch.tensor(self.times[j + 1]))
                    rows["old"].append(traj.logprobs[j, c])
                    rows["adv"].append(adv[c])
                    rows["prompt"].append(torch.tensor(pi))
        stacked = {k: torch.stack(v).to(self.device) for k, v in rows.items()}
        order = torch.randperm(stacked["old"].shape[0], generator=gen)
        metrics = self._reward_metrics(model_means, rater_means)
        metrics.update(group_spread(group_rewards, self.weights))
        return Rollout(step, stacked, order, max(1, parts), metrics)

    def _reward_metrics(self, model_means: list, rater_means: list) -> dict[str, float]:
        model = torch.stack(model_means).mean(0)
        out = {f"reward_{h}": float(model[k]) for k, h in enumerate(HEADS)}
        out["reward"] = sum(w * float(model[k]) for k, w in enumerate(self.weights))
        if rater_means:
            rater = torch.stack(rater_means).nanmean(0)
            # Like for like: the weighted heads the rater measures on this corpus.
            both = [
                k for k, w in enumerate(self.weights) if w > 0 and HEADS[k] not in self.skip_heads
            ]
            for k in both:
                out[f"rater_{HEADS[k]}"] = float(torch.nan_to_num(rater[k], nan=0.0))
            out["rater"] = sum(self.weights[k] * out[f"rater_{HEADS[k]}"] for k in both)
            out["reward_monitored"] = sum(self.weights[k] * float(model[k]) for k in both)
        return out

    def loss(self, rollout: Rollout, part: int | None = None):
        """The clipped per-head objective (plus KL) on one update's share of a rollout.

        With ``loss_rows_per_chunk`` below the share's rows the loss comes back as a
        :class:`ChunkedLoss`: the same gradient, accumulated chunk by chunk."""
        s = self.settings
        rows = rollout.part(part)
        x_v, x_a = rows["x_v"], rows["x_a"]
        metrics = dict(rollout.metrics)
        tokens = x_v[0, 0].numel() // self.dit.patch**2 + x_a.shape[-1]
        prompts = max(1, len(set(rollout.rows["prompt"].tolist())))
        tokens = int(tokens * x_v.shape[0] / prompts)
        n, size = x_v.shape[0], s.loss_rows_per_chunk
        if size <= 0 or size >= n:
            loss, per_head, kl, ratio = self._terms(rows)
            self._loss_metrics(metrics, rows, [(per_head.detach(), kl, ratio.detach())])
            return loss, metrics, tokens
        shares: list[tuple] = []

        def chunk(a: int):
            def run() -> torch.Tensor:
                sub = {k: v[a : a + size] for k, v in rows.items()}
                loss, per_head, kl, ratio = self._terms(sub)
                share = sub["old"].shape[0] / n  # chunk means -> the share's mean
                kl = None if kl is None else kl * share
                shares.append((per_head.detach() * share, kl, ratio.detach()))
                return loss * share

            return run

        chunks = [chunk(a) for a in range(0, n, size)]
        done = lambda: self._loss_metrics(metrics, rows, shares)  # noqa: E731
        return ChunkedLoss(chunks, self.module, done), metrics, tokens

    def _terms(self, rows: dict[str, torch.Tensor]):
        """(loss, (H,) per-head losses, KL or None, (R,) ratios) of some rows: means
        over them."""
        s = self.settings
        x_v, x_a = rows["x_v"], rows["x_a"]
        t, t_next = rows["t"], rows["t_next"]
        text = self._texts(rows["prompt"].tolist())
        null = self.dit.null_text_conditioning(x_v.shape[0], self.device)
        vel_v, vel_a = guided_velocities(self.module, x_v, x_a, t, text, null, s.text_scale)
        mean_v, mean_a, std = self._means(x_v, x_a, vel_v, vel_a, t, t_next, s.eta)
        new = gaussian_logprob(rows["next_v"], rows["next_a"], mean_v, mean_a, std)
        ratio = torch.exp(new - rows["old"])
        loss, per_head = clipped_objective(ratio, rows["adv"], self.weights, s.clip_range)
        kl_weight = s.kl_coefficient()
        if self.reference is None or kl_weight <= 0:
            return loss, per_head, None, ratio
        with torch.no_grad():
            ref_v, ref_a = guided_velocities(self.reference, x_v, x_a, t, text, null, s.text_scale)
            rmean_v, rmean_a, _ = self._means(x_v, x_a, ref_v, ref_a, t, t_next, s.eta)
        n = x_v[0].numel() + x_a[0].numel()
        sq = ((mean_v - rmean_v) ** 2).flatten(1).sum(1)
        sq = sq + ((mean_a - rmean_a) ** 2).flatten(1).sum(1)
        kl = (sq / (2 * std**2 * n)).mean()
        return loss + kl_weight * kl, per_head, kl.detach(), ratio

    def _loss_metrics(self, metrics: dict, rows: dict, shares: list[tuple]) -> None:
        """Adds the update's ratio, clip, KL and per-head figures to ``metrics``; each
        share is ((H,) per-head losses, KL or None, (r,) ratios), summing to the rows'."""
        s = self.settings
        per_head = sum(p for p, _, _ in shares)
        if shares[0][1] is not None:
            metrics["kl"] = float(sum(k for _, k, _ in shares))
        r = torch.cat([x for _, _, x in shares])
        metrics["ratio"] = float(r.mean())
        metrics["ratio_dev_max"] = float((r - 1.0).abs().max())
        metrics["clip_fraction"] = float(((r - 1.0).abs() > s.clip_range).float().mean())
        metrics["adv_abs"] = statistics.fmean(float(a) for a in rows["adv"].abs().mean(1))
        for k, h in enumerate(HEADS):
            if self.weights[k] > 0:
                metrics[f"loss_{h}"] = float(per_head[k])

    def step(self, indices: list[int], gen: torch.Generator):
        """One rollout and one update on all its rows (the stage splits a rollout over
        ``updates_per_rollout`` updates through :meth:`collect` and :meth:`loss`)."""
        return self.loss(self.collect(indices, gen), None)

    def _texts(self, prompt_rows: list[int]) -> TextConditioning:
        rows = [self.tokens[p][self.mask[p]].cpu() for p in prompt_rows]
        t, m, _ = pad_text(rows, None, self.tokens.shape[1])
        return TextConditioning(t.to(self.device), m.to(self.device))

    @staticmethod
    def _means(x_v, x_a, vel_v, vel_a, t, t_next, eta: float):
        """Per-row step means of both branches and the (B,) step widths."""

        def b(x, ref):
            return x.view(-1, *([1] * (ref.dim() - 1)))

        mean_v = step_mean(x_v, vel_v, b(t, x_v), b(t_next, x_v), eta)
        mean_a = step_mean(x_a, vel_a, b(t, x_a), b(t_next, x_a), eta)
        return mean_v, mean_a, eta * torch.sqrt((t - t_next).clamp_min(0.0))
