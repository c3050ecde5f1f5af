"""Can DanceGRPO move a real checkpoint, and how far, on a reward it can surely raise?

    python -m bench.grpo_checkpoint --carry .gpu/carry --reward brightness --steps 24
    python -m bench.grpo_checkpoint --carry .gpu/carry --reward rater --steps 24

The checkpoint (``checkpoints/default``) is trained by the product's
:class:`pipelines.align.grpo.GRPO` through the stage's
:class:`pipelines.align.stages.RolloutSchedule` and Adam, with the stage's defaults
(groups of 8, 10 SDE steps, eta 0.3, 2 updates a rollout) on the carried corpus's
training prompts, then scored on held-out prompts it never trained on: one group per
(prompt, seed) before and after, from the same noises, so the gain is paired.

Rewards: ``brightness`` is the decoded frames' mean brightness in [0, 1] (a property
any velocity field can change: if DanceGRPO cannot raise it at these settings, the
method or its step size is at fault, not the reward); ``rater`` is the alignment job's
reward (the probes' heads with the stage's head weights). Printed: the held-out gain of
the reward (and, for the rater, per head), mean +- standard error over prompts, and the
within-group spread of the reward before training (how far a best-of-G pick would get:
the room the policy has).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from pipelines.align.config import HEADS

ADHERENCE = HEADS.index("adherence")


class Brightness(nn.Module):
    """(G, heads): the decoded frames' mean brightness on the adherence head, 0 elsewhere."""

    def __init__(self, pipeline, frames: int):
        super().__init__()
        self.pipeline, self.frames = pipeline, frames

    def forward(self, video, audio, tokens, mask):
        x = self.pipeline.video_vae.decode(video.float())[:, :, : self.frames]  # (G, 3, F, H, W)
        out = torch.zeros(video.shape[0], len(HEADS))
        out[:, ADHERENCE] = ((x.clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3, 4)).cpu()
        return out


def scores(policy, prompt_index: int, seed: int) -> torch.Tensor:
    """(G, heads) rewards of one fresh group for a prompt (the same noises every call)."""
    with torch.no_grad():
        traj = policy.rollout(prompt_index, torch.Generator().manual_seed(seed))
        return policy.rewards(prompt_index, *traj.final).cpu()


def perturbed_scores(policy, prompt_index: int, seed: int, sigma: float):
    """(G, heads) rewards of the same group as :func:`scores`, of its final latents plus
    noise of std ``sigma`` (a change no one would see: how much of a group's spread is
    the reward's own noise), and the rms distance of its candidates' video latents from
    their mean (how far apart the group's candidates lie)."""
    with torch.no_grad():
        traj = policy.rollout(prompt_index, torch.Generator().manual_seed(seed))
        video, audio = traj.final
        gen = torch.Generator().manual_seed(seed + 1)
        shaken = (video + sigma * torch.randn(video.shape, generator=gen).to(video.device),
                  audio + sigma * torch.randn(audio.shape, generator=gen).to(audio.device))  # fmt: skip
        apart = float((video - video.mean(0, keepdim=True)).pow(2).mean().sqrt())
        clean = policy.rewards(prompt_index, video, audio).cpu()
        return clean, policy.rewards(prompt_index, *shaken).cpu(), apart


def held_out_scores(policy, prompts: list[int], seeds: int) -> torch.Tensor:
    """(prompts * seeds, G, heads) rewards on held-out prompts."""
    return torch.stack([scores(policy, p, 7919 * (k + 1)) for p in prompts for k in range(seeds)])


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    xs = [float(v) for v in x]
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return statistics.fmean(xs), se


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--carry", required=True, help="a carried corpus (its captions give the prompts)"
    )
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--reward", choices=("brightness", "rater"), default="brightness")
    ap.add_argument("--steps", type=int, default=24, help="loop steps (2 a rollout batch)")
    ap.add_argument("--batch", type=int, default=2, help="prompts a rollout batch")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--train-prompts", type=int, default=16)
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1, help="groups per held-out prompt")
    ap.add_argument("--own-noise", action="store_true", help="rlhf.shared_noise false")
    ap.add_argument(
        "--perturb", type=float, default=0.0,
        help="also rate each held-out group's final latents plus noise of this std",
    )  # fmt: skip
    ap.add_argument(
        "--eta", type=float, default=None, help="SDE noise level (default: the stage's)"
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    from model.pipeline import DuetPipeline
    from pipelines.align import grpo
    from pipelines.align.sampling import encode_prompts, latent_shapes, sampling_times
    from pipelines.align.stages import RolloutSchedule, prompt_sets
    from pipelines.shipped.align_job import build_config, parse_args
    from pipelines.shipped.carry import unpack

    work = tempfile.mkdtemp(prefix="grpo-ckpt-")
    manifest = unpack(args.carry, os.path.join(work, "data"))
    cfg = build_config(parse_args(["--carry", args.carry, "--out", work]), manifest)
    train, held = prompt_sets(cfg)
    train, held = train[: args.train_prompts], held[: args.held_out]
    prompts = train + held
    s = cfg.rlhf
    s.reward_source = "model" if args.reward == "brightness" else "rater"
    s.monitor_rater = False
    s.shared_noise = not args.own_noise
    if args.eta is not None:
        s.eta = args.eta
    pipeline = DuetPipeline.from_checkpoint(args.checkpoint).eval()
    v_shape, a_shape, frames = latent_shapes(pipeline.config, s.preferences.duration_s)
    tokens, mask = encode_prompts(pipeline, prompts)
    weights = (0.0, 1.0, 0.0, 0.0, 0.0) if args.reward == "brightness" else tuple(s.head_weights)
    policy = grpo.GRPO(
        settings=s, module=pipeline.dit, dit=pipeline.dit, reference=None,
        reward_model=Brightness(pipeline, frames), pipeline=pipeline, tokens=tokens,
        mask=mask, prompts=prompts, shapes=(v_shape, a_shape, frames),
        times=sampling_times(pipeline.config, v_shape, a_shape, s.sample_steps),
        device=torch.device("cpu"), weights=weights,
    )  # fmt: skip
    held_rows = list(range(len(train), len(prompts)))
    t0 = time.monotonic()
    before = held_out_scores(policy, held_rows, args.seeds)  # (N, G, H)
    print(
        f"{len(train)} training prompts, {len(held)} held out; before: {time.monotonic() - t0:.0f} s"
    )

    schedule = RolloutSchedule(policy, s, os.path.join(work, "rlhf"), rank=0)
    params = [p for p in pipeline.dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(1)
    batch: list[int] = []
    for step in range(args.steps):
        if step % s.updates_per_rollout == 0:
            batch = torch.randperm(len(train), generator=order)[: args.batch].tolist()
        loss, metrics, _ = schedule(batch, torch.Generator().manual_seed(100 + step), step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        print(
            f"step {step + 1}/{args.steps} reward {metrics['reward']:.4f} "
            f"ratio_dev {metrics['ratio_dev_max']:.2e} clip {metrics['clip_fraction']:.3f} "
            f"t {time.monotonic() - t0:.0f}s",
            flush=True,
        )
    w = torch.tensor(weights)
    spread = (before * w).sum(-1)
    room = mean_se(spread.max(1).values - spread.mean(1))
    print(f"best of {before.shape[1]} over the group mean, before: {room[0]:+.4f} +- {room[1]:.4f}")
    for k, h in enumerate(HEADS):
        if weights[k] > 0:
            head = before[:, :, k]
            std = mean_se(head.std(1))
            print(f"  {h:10s} within-group std {std[0]:.4f} +- {std[1]:.4f}")
    if args.perturb > 0:  # the reward's own noise against the groups' spread
        pairs = [perturbed_scores(policy, p, 7919, args.perturb) for p in held_rows]
        diff = torch.stack([b - a for a, b, _ in pairs])  # (N, G, H)
        apart = statistics.fmean(x for _, _, x in pairs)
        print(f"candidates' video latents lie {apart:.4f} (rms) from their group's mean; "
              f"rewards of the final latents plus noise of std {args.perturb:g}:")  # fmt: skip
        for k, h in enumerate(HEADS):
            if weights[k] > 0:
                flipped = float((diff[:, :, k] != 0).float().mean())
                own = float(diff[:, :, k].pow(2).mean().sqrt() / 2**0.5)
                print(f"  {h:10s} own noise std {own:.4f}, changed on {flipped:.0%} of candidates")
    if args.steps == 0:
        return 0
    after = held_out_scores(policy, held_rows, args.seeds)
    total = lambda x: (x * w).sum(-1).mean(1)  # noqa: E731  (N,) per group
    gain, se = mean_se(total(after) - total(before))
    print(
        f"held-out weighted reward: before {total(before).mean():.4f}, after {total(after).mean():.4f}"
    )
    print(f"gain {gain:+.4f} +- {se:.4f} ({gain / se if se > 0 else float('nan'):+.1f} se)")
    for k, h in enumerate(HEADS):
        if weights[k] > 0:
            g, e = mean_se(after[:, :, k].mean(1) - before[:, :, k].mean(1))
            print(
                f"  {h:10s} {before[:, :, k].mean():.4f} -> {after[:, :, k].mean():.4f}  {g:+.4f} +- {e:.4f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
