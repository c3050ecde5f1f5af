"""DanceGRPO on the flow sampler: group rollouts, per-head advantages, clipped ratio.

One training step, for each prompt of the worker's batch:

1. **Rollout** (no gradient): ``G`` candidates from one shared initial noise, sampled
   with the SDE of :mod:`pipelines.align.sde` (noise level ``eta``) and the text
   guidance the model is used with; the log-probability of every step is kept.
2. **Reward**: the learned reward model scores the final latents per head
   (``reward_source="rater"`` decodes and asks the probes instead; an ablation only).
3. **Advantages**: per head, normalised within the group (``(r - mean) / std``; a
   head on which the group does not differ gives 0), then weighted and summed, and
   clipped to ``adv_clip_max``. Optionally only the best and worst ``k`` candidates
   by advantage are trained on (best-and-worst-of-N).
4. **Policy loss** on a random ``timestep_fraction`` of the sampling steps:
   ``max(-A r, -A clip(r, 1 - c, 1 + c))`` with ``r = exp(logp_new - logp_old)`` of the
   step the sampler took; all chosen (step, candidate) rows go through one batched
   forward (so DDP sees one forward per backward). Optionally plus ``kl_weight`` times
   the KL from the frozen parent policy's step to this one's (both Gaussians of the
   same width: ``|mean - mean_ref|^2 / 2 std^2``), the guard against reward hacking
   that DanceGRPO leaves out.

The loop does one optimizer step per call, so ``r`` is 1 at the start of every step
(as in DanceGRPO without gradient accumulation across rollouts); the clip bounds
the ratio of the steps after the first of a rollout when ``timestep_fraction``
rows are spread over several forwards, and is kept for that and for parity.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from model.dit import TextConditioning
from pipelines.align.config import HEADS
from pipelines.align.sde import gaussian_logprob, guided_velocities, sde_rollout, step_mean
from pipelines.train.batches import pad_text


def group_advantages(
    rewards: torch.Tensor, weights: tuple[float, ...], clip: float
) -> torch.Tensor:
    """(G,) advantages from (G, H) per-head rewards of one group."""
    mean = rewards.mean(0, keepdim=True)
    std = rewards.std(0, unbiased=False, keepdim=True)
    norm = torch.where(
        std > 1e-6, (rewards - mean) / std.clamp_min(1e-6), torch.zeros_like(rewards)
    )
    w = torch.tensor(weights, dtype=rewards.dtype, device=rewards.device)
    return (norm * w).sum(-1).clamp(-clip, clip)


def select_candidates(adv: torch.Tensor, k: int) -> list[int]:
    """Indices of the best and worst ``k`` candidates (all when ``k`` is 0)."""
    if k <= 0:
        return list(range(adv.shape[0]))
    order = torch.argsort(adv, descending=True).tolist()
    return sorted(order[:k] + order[-k:])


def rater_rewards(pipeline, prompt: str, video, audio, frames: int) -> torch.Tensor:
    from pipelines.align.rater import rate_clip

    out = []
    for c in range(video.shape[0]):
        clip = pipeline.decode_latents(video[c : c + 1], audio[c : c + 1], frames, seed=c)
        scores = rate_clip(prompt, clip)
        out.append([float(scores[h]) if scores.get(h) is not None else 0.0 for h in HEADS])
    return torch.tensor(out)


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
    weights: tuple[float, ...] = ()  # per-head advantage weights (settings' by default)

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = tuple(self.settings.head_weights)

    def _text(self, prompt_index: int, rows: int) -> TextConditioning:
        tokens = self.tokens[prompt_index][self.mask[prompt_index]].cpu()
        t, m, _ = pad_text([tokens] * rows, None, self.tokens.shape[1])
        return TextConditioning(t.to(self.device), m.to(self.device))

    def rollout(self, prompt_index: int, gen: torch.Generator):
        s = self.settings
        g = s.group_size
        v_shape, a_shape, _ = self.shapes
        video = torch.randn(v_shape, generator=gen).expand(g, *v_shape[1:]).clone()
        audio = torch.randn(a_shape, generator=gen).expand(g, *a_shape[1:]).clone()
        text = self._text(prompt_index, g)
        null = self.dit.null_text_conditioning(g, self.device)
        was_training = self.module.training
        self.module.eval()
        traj = sde_rollout(
            self.module, video.to(self.device), audio.to(self.device), text, null,
            self.times, s.eta, s.text_scale, gen,
        )  # fmt: skip
        self.module.train(was_training)
        return traj

    @torch.no_grad()
    def rewards(self, prompt_index: int, video, audio) -> torch.Tensor:
        if self.settings.reward_source == "rater":
            return rater_rewards(
                self.pipeline, self.prompts[prompt_index], video, audio, self.shapes[2]
            ).to(self.device)
        g = video.shape[0]
        tokens = self.tokens[prompt_index : prompt_index + 1].expand(g, -1, -1)
        mask = self.mask[prompt_index : prompt_index + 1].expand(g, -1)
        return self.reward_model(video, audio, tokens, mask).float()

    def step(self, indices: list[int], gen: torch.Generator):
        s = self.settings
        n_steps = len(self.times) - 1
        n_train = max(1, round(s.timestep_fraction * n_steps))
        rows = {"x_v": [], "x_a": [], "next_v": [], "next_a": [], "t": [], "t_next": [],
                "old": [], "adv": [], "prompt": []}  # fmt: skip
        reward_means = []
        for pi in indices:
            traj = self.rollout(pi, gen)
            final_v, final_a = traj.final
            rewards = self.rewards(pi, final_v, final_a)  # (G, H)
            reward_means.append(rewards.mean(0))
            adv = group_advantages(rewards, self.weights, s.adv_clip_max)
            chosen = select_candidates(adv, s.best_worst_k)
            steps = torch.randperm(n_steps, generator=gen)[:n_train].tolist()
            for j in steps:
                for c in chosen:
                    rows["x_v"].append(traj.videos[j][c])
                    rows["x_a"].append(traj.audios[j][c])
                    rows["next_v"].append(traj.videos[j + 1][c])
                    rows["next_a"].append(traj.audios[j + 1][c])
                    rows["t"].append(self.times[j])
                    rows["t_next"].append(self.times[j + 1])
                    rows["old"].append(traj.logprobs[j, c])
                    rows["adv"].append(adv[c])
                    rows["prompt"].append(pi)
        x_v, x_a = torch.stack(rows["x_v"]), torch.stack(rows["x_a"])
        nxt_v, nxt_a = torch.stack(rows["next_v"]), torch.stack(rows["next_a"])
        t = torch.tensor(rows["t"], device=self.device)
        t_next = torch.tensor(rows["t_next"], device=self.device)
        old = torch.stack(rows["old"])
        adv = torch.stack(rows["adv"])
        text = self._texts(rows["prompt"])
        null = self.dit.null_text_conditioning(x_v.shape[0], self.device)
        vel_v, vel_a = guided_velocities(self.module, x_v, x_a, t, text, null, s.text_scale)
        mean_v, mean_a, std = self._means(x_v, x_a, vel_v, vel_a, t, t_next, s.eta)
        new = gaussian_logprob(nxt_v, nxt_a, mean_v, mean_a, std)
        ratio = torch.exp(new - old)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - s.clip_range, 1.0 + s.clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
        metrics = {}
        if self.reference is not None:
            with torch.no_grad():
                ref_v, ref_a = guided_velocities(
                    self.reference, x_v, x_a, t, text, null, s.text_scale
                )
                rmean_v, rmean_a, _ = self._means(x_v, x_a, ref_v, ref_a, t, t_next, s.eta)
            n = x_v[0].numel() + x_a[0].numel()
            sq = ((mean_v - rmean_v) ** 2).flatten(1).sum(1) + ((mean_a - rmean_a) ** 2).flatten(
                1
            ).sum(1)
            kl = (sq / (2 * std**2 * n)).mean()
            loss = loss + s.kl_weight * kl
            metrics["kl"] = float(kl.detach())
        rewards = torch.stack(reward_means).mean(0)
        for k, h in enumerate(HEADS):
            metrics[f"reward_{h}"] = float(rewards[k])
        weights = torch.tensor(self.weights, device=rewards.device, dtype=rewards.dtype)
        metrics["reward"] = float((rewards * weights).sum())
        metrics["ratio"] = float(ratio.detach().mean())
        metrics["clip_fraction"] = float(
            ((ratio.detach() - 1.0).abs() > s.clip_range).float().mean()
        )
        metrics["adv_abs"] = statistics.fmean(float(a) for a in adv.abs())
        tokens = x_v[0, 0].numel() // self.dit.patch**2 + x_a.shape[-1]
        return loss, metrics, int(tokens * x_v.shape[0] / max(1, len(indices)))

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
