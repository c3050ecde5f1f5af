"""How much of a DanceGRPO update is signal? The policy gradient's noise scale.

    python -m bench.grpo_gradient_noise --carry CARRY [--batches 6] [--groups 8]
    python -m bench.grpo_gradient_noise --carry CARRY --heads all,adherence,sync --sde-window 2
    python -m bench.grpo_gradient_noise --carry CARRY --by-step --rater-workers 12 --chunk 128
    python -m bench.grpo_gradient_noise --carry CARRY --advantage-norm batch
    python -m bench.grpo_gradient_noise --carry CARRY --sde-window 1 --sde-window-start 0

DanceGRPO steps with Adam, which moves every weight by about the learning rate whatever
the gradient holds, so an update whose gradient is mostly noise walks the model away from
where it was: every head falls, trained or not. This measures how much of one rollout
batch's gradient is the expected gradient. ``--batches`` independent rollout batches of
``--groups`` prompts each (drawn from the carry's captions; the stage's defaults: groups
of 8 from one shared noise, the SDE sampler, 2 s candidates, the rater's scores as the
reward, per-head group advantages) each give the first update's gradient ``g_k`` of the
stage's loss (ratio 1, no KL). With ``G`` the expected gradient and ``S`` the covariance
of one batch's:

- ``|G|^2`` estimated without bias by the mean dot product of two different batches'
  gradients, ``tr(S)`` by their spread about the mean;
- ``noise scale`` ``B * tr(S) / |G|^2``: the groups a batch needs for its gradient to
  hold as much signal as noise (McCandlish et al., 2018, "An empirical model of
  large-batch training"); a batch of ``B`` groups is ``B / (B + noise scale)`` signal;
- ``cos``: the mean cosine between two batches' gradients.

Each head in ``--heads`` (``all``: the stage's weighted sum) is measured on the same
rollouts, and a control with every group's advantages shuffled among its candidates
(no signal by construction: its ``|G|^2`` should be zero within its spread).
``--by-step`` trains every sampling step (``timestep_fraction`` 1) and adds the weighted
gradient of each step's rows alone: where in the trajectory the signal is. A second table
splits the weighted gradient by the network's parts (each block's video and audio
attention, text attention, MLP and modulation, the cross-modal exchange, the rest): where
in the network the signal is, for a DanceGRPO that trains only part of it.
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch

DURATION_S = 33 / 16  # align_job's candidates (the rater's sync labels steady at 2 s)


def prompts_of(carry: str) -> list[str]:
    """The carry's captions (its text table embeds them on a host without the encoder)."""
    from pipelines.shipped.carry import _PLAN_PREFIX, TableTextEncoder, use_text_table

    use_text_table(carry)
    return sorted(k for k in TableTextEncoder.table if not k.startswith(("@", _PLAN_PREFIX[0])))


def head_weights(name: str, stage: tuple[float, ...]) -> tuple[float, ...]:
    from pipelines.align.config import HEADS

    if name in ("all", "shuffled"):
        return stage
    if name not in HEADS:
        raise SystemExit(f"--heads: {name!r} is not a head ({', '.join(HEADS)}) or 'all'")
    return tuple(1.0 if h == name else 0.0 for h in HEADS)


def shuffle_advantages(rows: dict, group: int, n_train: int, gen: torch.Generator) -> dict:
    """The rows with each group's candidates' advantages permuted among its candidates."""
    adv = rows["adv"]  # (groups * G * n_train, H), rows in (group, candidate, step) order
    per = adv.view(-1, group, n_train, adv.shape[-1])
    perms = torch.stack([torch.randperm(group, generator=gen) for _ in range(per.shape[0])])
    out = torch.stack([per[k, perms[k]] for k in range(per.shape[0])]).reshape_as(adv)
    return {**rows, "adv": out}


def gradient(policy, rollout, params) -> torch.Tensor:
    for p in params:
        p.grad = None
    loss, _, _ = policy.loss(rollout, None)
    loss.backward()
    from pipelines.align.grpo import flat_gradient

    return flat_gradient(params)[0].cpu()


def part_of(name: str) -> str:
    """The network part a DiT parameter belongs to: ``video text_attn``, ``cross``, ..."""
    m = re.match(r"blocks\.\d+\.(video|audio|cross)\.([a-z_]+)", name)
    if m is None:
        return "embed/out"
    if m[1] == "cross":
        return "cross"
    return f"{m[1]} {'text_attn' if m[2] == 'norm_text' else m[2]}"  # the text norm feeds it


def part_slices(named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Index of each part's entries in the flat gradient (parameters in ``named``'s order)."""
    parts: dict[str, list[torch.Tensor]] = {}
    at = 0
    for name, p in named:
        parts.setdefault(part_of(name), []).append(torch.arange(at, at + p.numel()))
        at += p.numel()
    return {k: torch.cat(v) for k, v in parts.items()}


def print_row(label: str, grads: list[torch.Tensor], groups: int) -> None:
    from pipelines.align import grpo

    f = grpo.gradient_noise(grads, groups)
    share = groups / (groups + f["noise_scale"]) if f["signal"] > 0 else 0.0
    print(
        f"  {label:<16} {f['grad_norm']:10.3e} {f['signal']:11.3e} {f['signal_se']:10.2e} "
        f"{f['trace']:10.3e} {f['noise_scale']:12.1f} {share:13.3f} {f['cos']:7.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--carry", required=True, help="a carry whose text table holds captions")
    ap.add_argument("--batches", type=int, default=6, help="independent rollout batches (>= 3)")
    ap.add_argument("--groups", type=int, default=8, help="prompts (groups) a rollout batch")
    ap.add_argument("--heads", default="all,adherence,sync")
    ap.add_argument("--own-noise", action="store_true", help="rlhf.shared_noise false")
    ap.add_argument("--eta", type=float, default=0.3)
    ap.add_argument("--sde-window", type=int, default=0, help="rlhf.sde_window (0: all steps)")
    ap.add_argument("--sde-window-start", type=int, default=-1,
                    help="rlhf.sde_window_start (-1: drawn per batch)")  # fmt: skip
    ap.add_argument("--advantage-norm", default="group", help="rlhf.advantage_norm")
    ap.add_argument("--rater-workers", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=32, help="rows a forward (memory)")
    ap.add_argument(
        "--by-step", action="store_true",
        help="also each sampling step's share of the weighted gradient (every step trained)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.batches < 3:
        raise SystemExit("--batches must be at least 3 (the spread of the dot products)")
    if args.by_step and args.sde_window:
        raise SystemExit("--by-step trains every step: leave --sde-window out")
    captions = prompts_of(args.carry)

    from model.pipeline import DuetPipeline
    from pipelines.align import grpo
    from pipelines.align.config import RLHFStageConfig
    from pipelines.align.rater import rater_pool
    from pipelines.align.sampling import encode_prompts, latent_shapes, sampling_times

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = DuetPipeline.from_checkpoint(args.checkpoint).to(device)
    s = RLHFStageConfig(reward_source="rater", kl_weight=0.0, shared_noise=not args.own_noise,
                        eta=args.eta, loss_rows_per_chunk=args.chunk,
                        timestep_fraction=1.0 if args.by_step else 0.6,
                        sde_window=args.sde_window, sde_window_start=args.sde_window_start,
                        advantage_norm=args.advantage_norm)  # fmt: skip
    s.preferences.duration_s = DURATION_S
    try:
        s.validate()
    except ValueError as e:
        raise SystemExit(f"the settings asked for: {e}") from None
    rng = random.Random(args.seed)
    drawn = rng.sample(captions, min(len(captions), args.batches * args.groups))
    if len(drawn) < args.batches * args.groups:
        raise SystemExit(f"{args.carry} holds {len(captions)} captions, fewer than asked")
    v_shape, a_shape, frames = latent_shapes(pipeline.config, s.preferences.duration_s)
    tokens, mask = encode_prompts(pipeline, drawn)
    pool = rater_pool(args.rater_workers)
    policy = grpo.GRPO(
        settings=s, module=pipeline.dit, dit=pipeline.dit, reference=None, reward_model=None,
        pipeline=pipeline, tokens=tokens.to(device), mask=mask.to(device), prompts=drawn,
        shapes=(v_shape, a_shape, frames),
        times=sampling_times(pipeline.config, v_shape, a_shape, s.sample_steps),
        device=device, rater_pool=pool,
    )  # fmt: skip
    stage_weights = policy.weights
    heads = [h.strip() for h in args.heads.split(",") if h.strip()] + ["shuffled"]
    named = [(n, p) for n, p in pipeline.dit.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    windowed = 0 < s.sde_window < s.sample_steps
    n_train = s.sde_window if windowed else max(1, round(s.timestep_fraction * s.sample_steps))
    grads: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    spreads, t0 = [], time.perf_counter()
    pipeline.dit.train()
    for b in range(args.batches):
        indices = list(range(b * args.groups, (b + 1) * args.groups))
        gen = torch.Generator().manual_seed(args.seed * 1000 + b)
        rollout = policy.collect(indices, gen)
        spreads.append({k: v for k, v in rollout.metrics.items() if k.startswith("spread_")})
        for h in heads:
            policy.weights = head_weights(h, stage_weights)
            if h == "shuffled":
                shuffled = grpo.Rollout(rollout.step, dict(rollout.rows), rollout.order, 1)
                shuffled.rows = shuffle_advantages(rollout.rows, s.group_size, n_train, gen)
                grads[h].append(gradient(policy, shuffled, params))
            else:
                grads[h].append(gradient(policy, rollout, params))
        policy.weights = stage_weights
        for j, t in enumerate(policy.times[:-1] if args.by_step else []):
            rows = {k: v[rollout.rows["t"] == t] for k, v in rollout.rows.items()}
            step = grpo.Rollout(rollout.step, rows, torch.arange(len(rows["old"])), 1)
            grads.setdefault(f"step {j} t={t:.2f}", []).append(gradient(policy, step, params))
        print(f"  batch {b + 1}/{args.batches} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if pool is not None:
        pool.shutdown()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    start = s.sde_window_start
    where = f"from step {start}" if start >= 0 else "its start drawn per batch"
    spread = {k: sum(d[k] for d in spreads) / len(spreads) for k in spreads[0]}
    print(
        f"{name}, torch {torch.__version__}; {args.batches} batches of {args.groups} groups of "
        f"{s.group_size}, {s.sample_steps} SDE steps (eta {s.eta}, "
        f"{'own' if args.own_noise else 'shared'} noise, {s.advantage_norm} advantages, "
        f"{f'a window of {n_train} noisy steps, {where}' if windowed else 'every step noisy'}), "
        f"{n_train} steps a candidate trained"
    )
    print(
        "  within-group reward spread: " + ", ".join(f"{k[7:]} {v:.3f}" for k, v in spread.items())
    )
    header = (f"{'|g|':>10} {'|G|^2':>11} {'+-':>10} {'tr(S)':>10} {'noise scale':>12} "
              f"{'signal share':>13} {'cos':>7}")  # fmt: skip
    print(f"  {'advantages':<16} {header}")
    for h in grads:
        print_row(h, grads[h], args.groups)
    print(f"  {'part (' + heads[0] + ')':<16} {header}")
    for part, index in part_slices(named).items():
        print_row(part, [g[index] for g in grads[heads[0]]], args.groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
