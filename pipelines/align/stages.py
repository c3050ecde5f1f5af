"""The ``rlhf`` and ``distill`` stages as tasks of the training loop.

Both run inside :func:`pipelines.train.loop.run_stage` (one process, torchrun, or
Ray Train workers), checkpoint and resume like every stage. What each needs before
its first step is built once, by rank 0, under the stage's directory, and is
skipped when present (so a resumed or restarted stage reuses it):

``rlhf`` (parent: ``sft``)
  1. ``RUN/rlhf/preferences/``: candidates of the parent model for the training
     prompts (groups of G from one shared initial noise, the SDE sampler), rated by
     :mod:`pipelines.align.rater`, as the versioned table of
     :mod:`pipelines.align.preferences` with the clips and latents beside it;
  2. ``RUN/rlhf/reward/``: the reward model trained on it, with its per-head
     agreement on held-out groups;
  3. DanceGRPO steps (:mod:`pipelines.align.grpo`) on the training prompts.

``distill`` (parent: ``rlhf``)
  1. ``RUN/distill/couplings.safetensors``: (noise, teacher sample) pairs of the
     parent sampled with Heun and classifier-free guidance;
  2. reflow steps (:mod:`pipelines.align.distill`); the final checkpoint is marked
     as a Fast student (``extra.fast``), which ``generate(quality="fast")`` reads.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from core import storage
from model.flow_matching import resolution_shift, schedule
from model.parallelize import apply_ddp, parallelize_dit
from pipelines.align import grpo
from pipelines.align.config import HEADS
from pipelines.align.preferences import (
    NO_REFERENCES,
    TABLE_NAME,
    read_preferences,
    write_preferences,
)
from pipelines.align.prompts import manifest_prompts, split_prompts
from pipelines.align.rater import ranks, rate_clip
from pipelines.align.reward import (
    load_reward_model,
    reward_exists,
    save_reward_model,
    train_reward_model,
)
from pipelines.align.sde import sde_rollout
from pipelines.train.batches import pad_text

ALIGN_STAGES = ("rlhf", "distill")
COUPLINGS_NAME = "couplings.safetensors"


class PromptRow:
    """A training prompt as the epoch sampler sees it (an id and a single bucket)."""

    def __init__(self, index: int, prompt: str):
        self.clip_id = f"prompt{index:03d}"
        self.bucket = 0
        self.prompt = prompt


def prompt_sets(cfg) -> tuple[list[str], list[str]]:
    from model.configs import get_config

    prompts = manifest_prompts(cfg.data, get_config(cfg.preset).fps)
    return split_prompts(prompts, cfg.rlhf.prompts)


def distill_prompts(train_prompts: list[str], held_out: list[str], extra) -> list[str]:
    """The Fast student's prompts: the training prompts, then ``extra`` (held-out refused)."""
    leaked = sorted(set(extra) & set(held_out))
    if leaked:
        raise ValueError(f"distill.extra_prompts holds held-out prompt(s) {leaked}")
    return list(dict.fromkeys([*train_prompts, *extra]))


def latent_shapes(mcfg, duration_s: float) -> tuple[tuple, tuple, int]:
    """Video and audio latent shapes (batch 1) of a clip, and its frame count."""
    frames = mcfg.frames_for_duration(duration_s)
    n_lat = mcfg.num_latent_frames(frames)
    sf = mcfg.video_vae.spatial_factor
    v = (1, mcfg.video_vae.latent_channels, n_lat, mcfg.height // sf, mcfg.width // sf)
    a = (1, mcfg.audio_vae.latent_channels, n_lat * mcfg.audio_latents_per_video_latent)
    return v, a, frames


def sampling_times(mcfg, v_shape, a_shape, steps: int) -> list[float]:
    p = mcfg.dit.video_patch
    tokens = v_shape[2] * (v_shape[3] // p) * (v_shape[4] // p) + a_shape[2]
    return [float(x) for x in schedule(steps, resolution_shift(tokens, mcfg.flow))]


def encode_prompts(pipeline, prompts: list[str]):
    tokens, mask = pipeline.text_encoder.encode(prompts)
    return tokens, mask


# ---------------------------------------------------------------------------------
# Preference data and the reward model.


def _seed(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**62)
    return value


@torch.no_grad()
def build_preferences(cfg, pipeline, prompts: list[str], out_uri: str, log=print) -> str:
    """Rate G candidates per group for every prompt and round; returns the table URI."""
    p = cfg.rlhf.preferences
    mcfg = pipeline.config
    pipeline.eval()
    device = pipeline.device
    v_shape, a_shape, frames = latent_shapes(mcfg, p.duration_s)
    times = sampling_times(mcfg, v_shape, a_shape, p.steps)
    tokens, mask = encode_prompts(pipeline, prompts)
    g = p.candidates_per_prompt
    holdout = max(1, round(1.0 / cfg.rlhf.reward.holdout_fraction))
    rows = []
    for pi, prompt in enumerate(prompts):
        text = pad_text([tokens[pi][mask[pi]]] * g, None, mcfg.text.max_tokens)
        from model.dit import TextConditioning

        cond = TextConditioning(text[0].to(device), text[1].to(device))
        null = pipeline.dit.null_text_conditioning(g, device)
        for r in range(p.rounds):
            seed = _seed(cfg.seed, pi, r)
            gen = torch.Generator().manual_seed(seed)
            video = torch.randn(v_shape, generator=gen).expand(g, *v_shape[1:]).clone()
            audio = torch.randn(a_shape, generator=gen).expand(g, *a_shape[1:]).clone()
            noise_seed = _seed(seed, 1)
            traj = sde_rollout(
                pipeline.dit, video.to(device), audio.to(device), cond, null, times, p.eta,
                p.text_scale, torch.Generator().manual_seed(noise_seed),
            )  # fmt: skip
            final_v, final_a = traj.final
            group_id = f"p{pi:03d}-r{r:02d}"
            split = "val" if r % holdout == holdout - 1 else "train"
            scored = []
            for c in range(g):
                clip = pipeline.decode_latents(
                    final_v[c : c + 1], final_a[c : c + 1], frames, seed=noise_seed + c
                )
                scores = rate_clip(prompt, clip)
                base = storage.join(out_uri, "candidates", f"{group_id}-c{c}")
                clip_uri = ""
                if p.write_mp4:
                    from core.media import write_mp4

                    clip_uri = base + ".mp4"
                    write_mp4(clip_uri, clip, crf=18, aac_coder="fast")
                latent_uri = base + ".safetensors"
                storage.write_bytes(
                    latent_uri,
                    save_safetensors(
                        {
                            "video": final_v[c].cpu().contiguous(),
                            "audio": final_a[c].cpu().contiguous(),
                        }
                    ),
                )
                scored.append((scores, clip_uri, latent_uri))
            head_ranks = {h: ranks([s[0].get(h) for s in scored]) for h in HEADS}
            for c, (scores, clip_uri, latent_uri) in enumerate(scored):
                row = {
                    "group_id": group_id,
                    "candidate": c,
                    "prompt": prompt,
                    "references": NO_REFERENCES,
                    "seed": seed,
                    "noise_seed": noise_seed,
                    "clip_uri": clip_uri,
                    "latent_uri": latent_uri,
                    "rater_id": p.rater_id,
                    "split": split,
                }
                for h in HEADS:
                    row[f"score_{h}"] = scores.get(h)
                    row[f"rank_{h}"] = head_ranks[h][c]
                rows.append(row)
        if log is not None:
            log(f"preferences: prompt {pi + 1}/{len(prompts)}")
    return write_preferences(storage.join(out_uri, TABLE_NAME), rows)


def reward_inputs(pipeline, rows: list[dict]) -> dict:
    """Stacked latents and prompt tokens of preference rows (clips without latents are
    encoded with the pipeline's VAEs)."""
    from core.media import read_clip

    videos, audios = [], []
    for row in rows:
        if row["latent_uri"]:
            t = load_safetensors(storage.read_bytes(row["latent_uri"]))
            videos.append(t["video"])
            audios.append(t["audio"])
        else:
            clip = read_clip(row["clip_uri"])
            with torch.no_grad():
                zv, za = pipeline.encode_clip(clip)
            videos.append(zv[0].cpu())
            audios.append(za[0].cpu())
    prompts = sorted({r["prompt"] for r in rows})
    tokens, mask = encode_prompts(pipeline, prompts)
    index = torch.tensor([prompts.index(r["prompt"]) for r in rows])
    return {
        "video": torch.stack(videos),
        "audio": torch.stack(audios),
        "tokens": tokens[index],
        "mask": mask[index],
    }


def reward_dims(pipeline) -> dict:
    mcfg = pipeline.config
    return {
        "video_channels": mcfg.video_vae.latent_channels,
        "audio_channels": mcfg.audio_vae.latent_channels,
        "text_dim": mcfg.text.embed_dim,
        "audio_per_video": mcfg.audio_latents_per_video_latent,
    }


def ensure_reward_model(cfg, pipeline, rt, log=print):
    """Preference data and the reward model of the run's rlhf stage (built once)."""
    from pipelines.train.loop import stage_uri

    here = stage_uri(cfg, "rlhf")
    pref_uri = storage.join(here, "preferences")
    reward_uri = storage.join(here, "reward")
    if rt.is_main and not reward_exists(reward_uri):
        train_prompts, held = prompt_sets(cfg)
        table = storage.join(pref_uri, TABLE_NAME)
        if not storage.exists(table):
            build_preferences(cfg, pipeline, train_prompts, pref_uri, log)
        rows = read_preferences(table)
        inputs = reward_inputs(pipeline, rows)
        model, report = train_reward_model(rows, inputs, cfg.rlhf.reward, reward_dims(pipeline))
        report.update({"train_prompts": train_prompts, "held_out_prompts": held,
                       "preferences": table, "candidates": len(rows)})  # fmt: skip
        save_reward_model(reward_uri, model, {"report": report})
        if log is not None:
            log("reward model: " + json.dumps(report.get("val_agreement", {})))
    rt.barrier()
    model, meta = load_reward_model(reward_uri)
    return model, meta


# ---------------------------------------------------------------------------------
# Tasks of the training loop.


def _wrap(cfg, pipeline, rt):
    dit = pipeline.dit
    dit.train()
    module = parallelize_dit(dit, cfg.parallel)
    if rt.distributed and not cfg.parallel.fsdp:
        module = apply_ddp(module)
    return module


MIN_HEAD_PAIRS = 10


def active_head_weights(weights, train_pairs: dict, reward_source: str) -> tuple[float, ...]:
    """Head weights with the heads the reward model never learned set to 0.

    A head with (almost) no preference pairs in the training groups (sync, when the
    parent model makes no candidate with a matched impact sound) has an untrained
    output; group-normalised, it would add pure noise to every advantage.
    """
    if reward_source != "model":
        return tuple(weights)
    return tuple(
        w if train_pairs.get(h, 0) >= MIN_HEAD_PAIRS else 0.0
        for h, w in zip(HEADS, weights, strict=True)
    )


def rlhf_task(cfg, pipeline, rt):
    from pipelines.train.loop import StageTask

    s = cfg.rlhf
    pipeline.to(rt.device)
    reward_model, reward_meta = ensure_reward_model(cfg, pipeline, rt)
    reward_model.to(rt.device)
    weights = active_head_weights(
        s.head_weights, reward_meta["report"]["train_pairs"], s.reward_source
    )
    train_prompts, _ = prompt_sets(cfg)
    rows = [PromptRow(i, p) for i, p in enumerate(train_prompts)]
    tokens, mask = encode_prompts(pipeline, train_prompts)
    reference = None
    if s.kl_weight > 0:
        import copy

        reference = copy.deepcopy(pipeline.dit).eval().requires_grad_(False)
    module = _wrap(cfg, pipeline, rt)
    mcfg = pipeline.config
    v_shape, a_shape, frames = latent_shapes(mcfg, s.preferences.duration_s)
    times = sampling_times(mcfg, v_shape, a_shape, s.sample_steps)
    policy = grpo.GRPO(
        settings=s,
        module=module,
        dit=pipeline.dit,
        reference=reference,
        reward_model=reward_model,
        pipeline=pipeline,
        tokens=tokens.to(rt.device),
        mask=mask.to(rt.device),
        prompts=train_prompts,
        shapes=(v_shape, a_shape, frames),
        times=times,
        device=rt.device,
        weights=weights,
    )

    def batch(indices, gen, step):
        return policy.step(indices, gen)

    groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": s.lr}]
    return StageTask("rlhf", module, ("dit",), s, rows, batch, groups, None)


def distill_task(cfg, pipeline, rt):
    from pipelines.align import distill
    from pipelines.train.loop import StageTask, stage_uri

    s = cfg.distill
    pipeline.to(rt.device)
    prompts = distill_prompts(*prompt_sets(cfg), s.extra_prompts)
    uri = storage.join(stage_uri(cfg, "distill"), COUPLINGS_NAME)
    if rt.is_main and not storage.exists(uri):
        couplings = distill.teacher_couplings(pipeline, prompts, s, cfg.seed)
        storage.write_bytes(uri, save_safetensors(couplings))
    rt.barrier()
    couplings = load_safetensors(storage.read_bytes(uri))
    tokens, mask = encode_prompts(pipeline, prompts)
    module = _wrap(cfg, pipeline, rt)
    mcfg = pipeline.config
    v_shape, a_shape, _ = latent_shapes(mcfg, s.duration_s)
    grid = distill.student_grid(mcfg, v_shape, a_shape, s.student_steps)
    rows = [distill.CouplingRow(i) for i in range(couplings["noise_video"].shape[0])]

    def batch(indices, gen, step):
        return distill.reflow_loss(
            module, couplings, indices, tokens, mask, grid, gen, rt.device, mcfg.text.max_tokens
        )

    groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": s.lr}]
    task = StageTask("distill", module, ("dit",), s, rows, batch, groups, None)
    task.final_extra = {
        "fast": {
            "steps": list(s.student_steps),
            "default_steps": s.default_steps,
            "sampler": "euler",
            "guidance": "distilled",
            "teacher_text_scale": s.text_scale,
            "teacher_steps": s.teacher_steps,
            "method": "reflow on guided teacher couplings",
        }
    }
    return task


def align_task(cfg, stage: str, pipeline, rt):
    if stage == "rlhf":
        return rlhf_task(cfg, pipeline, rt)
    if stage == "distill":
        return distill_task(cfg, pipeline, rt)
    raise ValueError(f"not an alignment stage: {stage!r}")
