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
  2. ``RUN/rlhf/reward/``: the reward model trained on it (and on people's
     judgements beside the table, weighted by ``rlhf.reward.human_weight``), with its
     per-head agreement on held-out *prompts* (every ``1 / holdout_fraction``-th
     preference prompt: none of their pairs reaches training);
  3. DanceGRPO (:mod:`pipelines.align.grpo`) on the training prompts: a rollout
     batch every ``updates_per_rollout`` loop steps, one optimiser step per loop
     step on its share of the batch (:class:`RolloutSchedule`). With the learned
     reward it first checks the reward model's held-out agreement against
     ``rlhf.reward.min_agreement`` (the floor) and refuses to start below it. With
     ``reward_source = "judge"`` steps 1-2 are skipped: a vision-language endpoint
     (:mod:`pipelines.align.judge`) scores the decoded candidates; with ``"rater"``
     (the ablation) too: the probes score them.

Prompts are the manifest's captions, of any corpus; on a corpus that is not the
synthetic world the rater heads that need it (:data:`pipelines.align.rater.WORLD_HEADS`)
are skipped, and the reward model's and the stage's reports say so.

``distill`` (parent: ``rlhf``), ``distill.method``:
  ``reflow`` 1. ``RUN/distill/couplings.safetensors``: (noise, teacher sample) pairs
     of the parent sampled with Heun and classifier-free guidance;
     2. reflow steps (:mod:`pipelines.align.distill`).
  ``dmd2``: distribution matching over the whole caption distribution and every
     clip length (:mod:`pipelines.align.dmd`); nothing is built before the steps,
     the fake score is checkpointed beside the student.
  The final checkpoint is marked as a Fast student (``extra.fast``), which
  ``generate(quality="fast")`` reads.
"""

from __future__ import annotations

import json
import time

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from core import storage
from core.probes.detect import COLOR_NAMES
from model.parallelize import apply_ddp, parallelize_dit
from pipelines.align import grpo
from pipelines.align.config import HEADS
from pipelines.align.contrast_pairs import (
    contrast_latents,
    contrast_pairs,
    contrast_rows,
    pick_contrasts,
)
from pipelines.align.observer import decode_frames
from pipelines.align.preferences import (
    NO_REFERENCES,
    TABLE_NAME,
    read_judgements,
    read_preferences,
    weighted_pairs,
    write_preferences,
)
from pipelines.align.prompts import manifest_prompts, split_prompts
from pipelines.align.rater import (
    WORLD_HEADS,
    preference_scores,
    ranks,
    rate_clips_later,
    rater_pool,
    skipped_heads,
)
from pipelines.align.reward import (
    check_agreement_floor,
    load_reward_model,
    reward_exists,
    save_reward_model,
    split_by_prompt,
    train_reward_model,
)
from pipelines.align.sampling import encode_prompts, latent_shapes, sampling_times
from pipelines.align.sde import sde_rollout
from pipelines.train.batches import pad_text
from pipelines.train.task import StageTask, ensure_latents, stage_uri

ALIGN_STAGES = ("rlhf", "distill")
COUPLINGS_NAME = "couplings.safetensors"
GRAMMAR_POOL_NAME = "grammar_prompts.txt"
DMD_PAIRS_NAME = "regression_pairs.safetensors"


class PromptRow:
    """A training prompt as the epoch sampler sees it (an id and a single bucket)."""

    def __init__(self, index: int, prompt: str):
        self.clip_id = f"prompt{index:03d}"
        self.bucket = 0
        self.prompt = prompt


# Offsets the grammar prompts' draw from the run's seed, so it is not DMD2's pool.
_GRAMMAR_PROMPTS_SEED = 7919


def prompt_sets(cfg) -> tuple[list[str], list[str]]:
    """(training, held-out) prompts: the manifest's captions split, then
    ``rlhf.prompts.grammar_prompts`` grammar captions added to the training ones (drawn
    from the run's seed, so every host reading the same manifest draws the same)."""
    from model.configs import get_config
    from pipelines.align.dmd import PromptStream

    prompts = manifest_prompts(cfg.data, get_config(cfg.preset).fps)
    train, held = split_prompts(prompts, cfg.rlhf.prompts)
    n = cfg.rlhf.prompts.grammar_prompts
    if n > 0:
        stream = PromptStream(train, held, 1.0, n, cfg.seed + _GRAMMAR_PROMPTS_SEED)
        train = list(dict.fromkeys([*train, *stream.pool]))
    return train, held


def distill_prompts(train_prompts: list[str], held_out: list[str], extra) -> list[str]:
    """The Fast student's prompts: the training prompts, then ``extra`` (held-out refused)."""
    leaked = sorted(set(extra) & set(held_out))
    if leaked:
        raise ValueError(f"distill.extra_prompts holds held-out prompt(s) {leaked}")
    return list(dict.fromkeys([*train_prompts, *extra]))


# ---------------------------------------------------------------------------------
# Preference data and the reward model.


def _seed(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**62)
    return value


@torch.no_grad()
def build_preferences(
    cfg, pipeline, prompts: list[str], out_uri: str, log=print, skip: tuple[str, ...] = ()
) -> str:
    """Rate G candidates per group for every prompt and round; returns the table URI.

    Heads in ``skip`` (they need the synthetic world) are left unrated. The rater runs
    in ``rlhf.rater_workers`` processes when set."""
    pool = rater_pool(cfg.rlhf.rater_workers)
    try:
        return _build_preferences(cfg, pipeline, prompts, out_uri, log, skip, pool)
    finally:
        if pool is not None:
            pool.shutdown()


def _build_preferences(cfg, pipeline, prompts, out_uri, log, skip, pool) -> str:
    from collections import deque

    p = cfg.rlhf.preferences
    pipeline.eval()
    frames = latent_shapes(pipeline.config, p.duration_s)[2]
    tokens, mask = encode_prompts(pipeline, prompts)
    g = p.candidates_per_prompt
    # Groups sampled ahead of their ratings: enough to keep every rater process busy
    # while the GPU samples (a group of 4 alone would leave 8 of 12 idle).
    ahead = 0 if pool is None else -(-2 * cfg.rlhf.rater_workers // g)
    # The probes' frame-by-frame observations go beside each candidate's latents where
    # they mean something: on the synthetic world (its palette), not on footage.
    observe = not set(WORLD_HEADS) & set(skip)
    rows, pending = [], deque()
    jobs = [(pi, r) for pi in range(len(prompts)) for r in range(p.rounds)]
    for start in range(0, len(jobs), p.groups_per_batch):
        batch = jobs[start : start + p.groups_per_batch]
        seeds = [_seed(cfg.seed, pi, r) for pi, r in batch]
        texts = [tokens[pi][mask[pi]] for pi, _ in batch]
        final_v, final_a = _sample_groups(cfg, pipeline, texts, seeds)
        for k, (pi, r) in enumerate(batch):
            noise_seed = _seed(seeds[k], 1)
            group_v, group_a = final_v[k * g : (k + 1) * g], final_a[k * g : (k + 1) * g]
            clips = [
                pipeline.decode_latents(group_v[c : c + 1], group_a[c : c + 1], frames,
                                        seed=noise_seed + c)
                for c in range(g)
            ]  # fmt: skip
            pending.append({
                "group_id": f"p{pi:03d}-r{r:02d}", "prompt": prompts[pi], "seed": seeds[k],
                "noise_seed": noise_seed, "clips": clips,
                "latents": list(zip(group_v.cpu(), group_a.cpu(), strict=True)),
                "scores": rate_clips_later([prompts[pi]] * g, clips, skip, pool, observe),
            })  # fmt: skip
            while len(pending) > ahead:
                rows += _group_rows(pending.popleft(), p, out_uri)
        if log is not None:
            log(f"preferences: prompt {batch[-1][0] + 1}/{len(prompts)}")
    for group in pending:
        rows += _group_rows(group, p, out_uri)
    split_by_prompt(rows, cfg.rlhf.reward.holdout_fraction)
    return write_preferences(storage.join(out_uri, TABLE_NAME), rows)


def _sample_groups(cfg, pipeline, texts: list[torch.Tensor], seeds: list[int]):
    """Final (video, audio) latents of one group of G candidates per (prompt tokens,
    seed), all sampled in one SDE rollout: rows ``k G .. (k + 1) G - 1`` are group k.
    Each group draws its initial noise from its seed (one shared by its candidates, or
    one each) and its sampler noise from ``_seed(seed, 1)``, as it would alone."""
    from model.dit import TextConditioning

    p, mcfg, device = cfg.rlhf.preferences, pipeline.config, pipeline.device
    g = p.candidates_per_prompt
    v_shape, a_shape, _ = latent_shapes(mcfg, p.duration_s)
    n = 1 if p.shared_noise else g  # initial noises a group
    video, audio = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        video.append(torch.randn((n, *v_shape[1:]), generator=gen).expand(g, *v_shape[1:]))
        audio.append(torch.randn((n, *a_shape[1:]), generator=gen).expand(g, *a_shape[1:]))
    text = pad_text([t for t in texts for _ in range(g)], None, mcfg.text.max_tokens)
    cond = TextConditioning(text[0].to(device), text[1].to(device))
    null = pipeline.dit.null_text_conditioning(g * len(seeds), device)
    times = sampling_times(mcfg, v_shape, a_shape, p.steps)
    noise = [torch.Generator().manual_seed(_seed(seed, 1)) for seed in seeds]
    traj = sde_rollout(pipeline.dit, torch.cat(video).to(device), torch.cat(audio).to(device),
                       cond, null, times, p.eta, p.text_scale, noise)  # fmt: skip
    return traj.final


def _group_rows(group: dict, p, out_uri: str) -> list[dict]:
    """A sampled group's rows once its ratings are in; its latents (and MP4s) written."""
    raw = group["scores"]()
    rated = [preference_scores(r, p.adherence_score) for r in raw]
    scored = []
    for c, (clip, scores) in enumerate(zip(group["clips"], rated, strict=True)):
        base = storage.join(out_uri, "candidates", f"{group['group_id']}-c{c}")
        clip_uri = ""
        if p.write_mp4:
            from core.media import write_mp4

            clip_uri = base + ".mp4"
            write_mp4(clip_uri, clip, crf=18, aac_coder="fast")
        latent_uri = base + ".safetensors"
        video, audio = group["latents"][c]
        tensors = {"video": video.contiguous(), "audio": audio.contiguous()}
        metadata = None
        if "observations" in raw[c]:
            tensors.update(observation_tensors(raw[c]["observations"]))
            metadata = {"observed_colours": ",".join(COLOR_NAMES)}
        storage.write_bytes(latent_uri, save_safetensors(tensors, metadata=metadata))
        scored.append((scores, clip_uri, latent_uri))
    head_ranks = {h: ranks([s[0].get(h) for s in scored]) for h in HEADS}
    rows = []
    for c, (scores, clip_uri, latent_uri) in enumerate(scored):
        row = {
            "group_id": group["group_id"],
            "candidate": c,
            "prompt": group["prompt"],
            "references": NO_REFERENCES,
            "seed": group["seed"],
            "noise_seed": group["noise_seed"],
            "clip_uri": clip_uri,
            "latent_uri": latent_uri,
            "rater_id": p.rater_id,
            "split": "train",  # set by prompt below
        }
        for h in HEADS:
            row[f"score_{h}"] = scores.get(h)
            row[f"rank_{h}"] = head_ranks[h][c]
        rows.append(row)
    return rows


def observation_tensors(observations: dict) -> dict[str, torch.Tensor]:
    """:func:`pipelines.align.rater.frame_observations` as a candidate file's tensors:
    ``observed_colour_counts`` (frames, colours) int16 (the colours' names in the file's
    metadata, ``observed_colours``), ``observed_objects`` (frames, K, 3) float32 each
    frame's objects as (colour index, x, y), rows of colour -1 past the frame's last,
    ``observed_impact`` and ``observed_onset`` (frames,) uint8."""
    per_frame = observations["objects"]
    most = max(1, max((len(f) for f in per_frame), default=0))
    objects = torch.full((len(per_frame), most, 3), -1.0)
    for f, found in enumerate(per_frame):
        if found:
            objects[f, : len(found)] = torch.tensor(found, dtype=torch.float32)
    return {
        "observed_colour_counts": torch.tensor(observations["colour_counts"], dtype=torch.int16),
        "observed_objects": objects,
        "observed_impact": torch.tensor(observations["impact"], dtype=torch.uint8),
        "observed_onset": torch.tensor(observations["onset"], dtype=torch.uint8),
    }


def candidate_files(rows: list[dict]) -> list[dict]:
    """Each row's candidate file (latents, and the probes' observations where the stage
    stored them); ``{}`` for a row without one."""
    return [load_safetensors(storage.read_bytes(r["latent_uri"])) if r.get("latent_uri")
            else {} for r in rows]  # fmt: skip


def reward_inputs(pipeline, rows: list[dict], files: list[dict] | None = None) -> dict:
    """Stacked latents and prompt tokens of preference rows (clips without latents are
    encoded with the pipeline's VAEs); ``files``: the rows' :func:`candidate_files`,
    when already read."""
    from core.media import read_clip

    files = candidate_files(rows) if files is None else files
    videos, audios = [], []
    for row, t in zip(rows, files, strict=True):
        if row["latent_uri"]:
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


def stored_observations(rows: list[dict], files: list[dict] | None = None) -> dict:
    """The probes' observations stored in the rows' candidate files
    (:func:`observation_tensors`): ``observed`` (N,) which rows carry them, and
    ``observed_counts`` (N, F, P), ``observed_objects`` (N, F, K, 3), ``observed_impact``
    and ``observed_onset`` (N, F), zeros (objects -1) elsewhere; empty when no row
    carries any (footage, people's clips)."""
    files = candidate_files(rows) if files is None else files
    found = [f for f in files if "observed_colour_counts" in f]
    if not found:
        return {}
    frames, colours = found[0]["observed_colour_counts"].shape
    n = len(rows)
    out = {
        "observed": torch.tensor(["observed_colour_counts" in f for f in files]),
        "observed_counts": torch.zeros(n, frames, colours),
        "observed_impact": torch.zeros(n, frames),
        "observed_onset": torch.zeros(n, frames),
    }
    # Each frame's objects, padded to the most any frame holds.
    most = max(f["observed_objects"].shape[1] for f in found)
    out["observed_objects"] = torch.full((n, frames, most, 3), -1.0)
    for i, f in enumerate(files):
        if "observed_colour_counts" in f:
            out["observed_counts"][i] = f["observed_colour_counts"][:frames].float()
            k = f["observed_objects"].shape[1]
            out["observed_objects"][i, :, :k] = f["observed_objects"][:frames]
            out["observed_impact"][i] = f["observed_impact"][:frames].float()
            out["observed_onset"][i] = f["observed_onset"][:frames].float()
    return out


def observer_inputs(
    pipeline, rows: list[dict], inputs: dict, size: int, files: list[dict] | None = None
) -> dict:
    """``inputs`` plus what the reward model's observer learns from
    (:mod:`pipelines.align.observer`): the probes' observations of the rows
    (:func:`stored_observations`) and every row's frames decoded from its latents at
    ``size`` pixels a side. ``inputs`` unchanged when no row carries observations:
    nothing to learn to see. ``files``: the rows' :func:`candidate_files`, when already
    read."""
    seen = stored_observations(rows, files)
    if not seen:
        return inputs
    frames, n = seen["observed_counts"].shape[1], len(rows)
    device = next(pipeline.video_vae.parameters()).device
    decoded = torch.cat([
        decode_frames(pipeline.video_vae, inputs["video"][i : i + 16].to(device), frames, size).cpu()
        for i in range(0, n, 16)
    ])  # fmt: skip
    return {**inputs, **seen, "frames": decoded}


def corpus_contrast_inputs(cfg, pipeline, held_out: list[str], like: dict):
    """Contrast rows (:mod:`pipelines.align.contrast_pairs`) of the corpus's training
    clips and their inputs, cut to the latent shape of ``like`` (the preference rows')."""
    from core.media import read_clip
    from pipelines.train.data import load_clip_rows

    r = cfg.rlhf.reward
    mcfg = pipeline.config
    n_lat, n_audio = like["video"].shape[2], like["audio"].shape[-1]
    frames = 1 + mcfg.video_vae.temporal_factor * (n_lat - 1)
    clips = [c for c in load_clip_rows(cfg.data, mcfg.fps, split="train") if c.num_frames >= frames]
    if any(not c.clip_uri for c in clips):
        raise ValueError(
            f"{cfg.data.curated_uri}: the manifest names no clip files (a captions-only "
            "carry), and the reward model's corpus contrasts encode clips: set "
            "rlhf.reward.corpus_contrasts = 0 or use a carry with its clips"
        )
    prompts, picks = pick_contrasts(
        [c.text for c in clips], [c.has_audio for c in clips], held_out, r.corpus_contrasts, r.seed
    )
    rows = contrast_rows(prompts, picks)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def latents(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in cache:
            clip = read_clip(clips[i].clip_uri, require_audio=False)
            with torch.no_grad():
                zv, za = pipeline.encode_clip(clip, num_frames=frames)
            cache[i] = (zv[0, :, :n_lat].cpu(), za[0, :, :n_audio].cpu())
        return cache[i]

    video, audio = contrast_latents(
        rows, latents, r.contrast_shift_steps, mcfg.audio_latents_per_video_latent
    )
    names = sorted({row["prompt"] for row in rows})
    tokens, mask = encode_prompts(pipeline, names)
    index = torch.tensor([names.index(row["prompt"]) for row in rows], dtype=torch.long)
    return rows, {"video": video, "audio": audio, "tokens": tokens[index], "mask": mask[index]}


def concat_inputs(a: dict, b: dict) -> dict:
    """Reward-model inputs of two row sets as one; prompt tokens padded to the longer
    (each set is padded to its own longest prompt)."""
    length = max(a["tokens"].shape[1], b["tokens"].shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        extra = length - x.shape[1]
        if extra == 0:
            return x
        return torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)

    out = {k: torch.cat([a[k], b[k]]) for k in a if k not in ("tokens", "mask")}
    for k in ("tokens", "mask"):
        out[k] = torch.cat([pad(a[k]), pad(b[k])])
    return out


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
    here = stage_uri(cfg, "rlhf")
    pref_uri = storage.join(here, "preferences")
    reward_uri = storage.join(here, "reward")
    if rt.is_main and not reward_exists(reward_uri):
        train_prompts, held = prompt_sets(cfg)
        skip, why = skipped_heads(train_prompts + held)
        table = storage.join(pref_uri, TABLE_NAME)
        if not storage.exists(table):
            build_preferences(cfg, pipeline, train_prompts, pref_uri, log, skip)
        # Held out by prompt whatever the table says (an older table split by round,
        # people's rows): agreement is then measured on prompts it never trained on.
        rows = split_by_prompt(read_preferences(table), cfg.rlhf.reward.holdout_fraction)
        judgements = read_judgements(table)
        r = cfg.rlhf.reward

        def pairs_of(sub: list[dict], head: str):
            return weighted_pairs(sub, head, r.min_margin, judgements,
                                  human_weight=r.human_weight, rater_weight=r.rater_weight,
                                  rater_id=cfg.rlhf.preferences.rater_id)  # fmt: skip

        # Each candidate file read once: latents here, the probes' observations (all
        # that is kept of it) for the observer below.
        files = candidate_files(rows)
        inputs = reward_inputs(pipeline, rows, files)
        files = [{k: v for k, v in f.items() if k.startswith("observed_")} for f in files]
        candidates, contrasts = len(rows), 0
        if r.corpus_contrasts > 0:
            extra, extra_inputs = corpus_contrast_inputs(cfg, pipeline, held, inputs)
            rows = rows + extra
            files = files + candidate_files(extra)
            inputs = concat_inputs(inputs, extra_inputs)
            contrasts = len({row["contrast"] for row in extra})

        def all_pairs_of(sub: list[dict], head: str):
            return pairs_of(sub, head) + contrast_pairs(sub, head, r.contrast_weight)

        if r.observe:
            inputs = observer_inputs(pipeline, rows, inputs, r.observer_size, files)

        model, report = train_reward_model(rows, inputs, r, reward_dims(pipeline),
                                           pairs_of=all_pairs_of, device=rt.device)  # fmt: skip
        report["corpus_contrasts"] = contrasts
        report["adherence_score"] = cfg.rlhf.preferences.adherence_score
        report.update({"train_prompts": train_prompts, "held_out_prompts": held,
                       "preferences": table, "candidates": candidates,
                       "judgements": len(judgements),
                       "rater_skipped_heads": list(skip), "rater_skip_reason": why})  # fmt: skip
        save_reward_model(reward_uri, model, {"report": report})
        if log is not None:
            log(f"reward model, held-out agreement on {len(report['held_out']['prompts'])} "
                "unseen prompt(s): " + json.dumps(report.get("val_agreement", {})))  # fmt: skip
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


def active_head_weights(weights, train_pairs: dict) -> tuple[float, ...]:
    """Head weights with the heads the learned reward model never learned set to 0.

    A head with (almost) no preference pairs in the training groups (sync, when the
    parent model makes no candidate with a matched impact sound) has an untrained
    output; group-normalised, it would add pure noise to every advantage.
    """
    return tuple(
        w if train_pairs.get(h, 0) >= MIN_HEAD_PAIRS else 0.0
        for h, w in zip(HEADS, weights, strict=True)
    )


class RolloutSchedule:
    """Several optimiser steps per rollout batch inside the loop's one step per call.

    Loop step ``k`` belongs to the rollout drawn at ``k - k % updates_per_rollout``
    (with that step's generator and the prompts the sampler gave it; the batches the
    sampler gives the other steps of the rollout are not used) and trains on its
    share ``k % updates_per_rollout`` of the rows. Resume stays exact: a rollout with
    a checkpoint inside it (``checkpoint_every`` not a multiple of
    ``updates_per_rollout``) is written beside the checkpoints, per rank, and a run
    resumed inside it reads it back instead of drawing from weights it no longer has.
    """

    def __init__(self, policy: grpo.GRPO, settings, stage_uri: str, rank: int):
        self.policy = policy
        self.s = settings
        self.uri = storage.join(stage_uri, "rollouts", f"rank{rank:04d}.safetensors")
        self.current: grpo.Rollout | None = None

    def __call__(self, indices, gen, step: int):
        u = self.s.updates_per_rollout
        start = step - step % u
        if self.current is None or self.current.step != start:
            if step == start:
                parts = min(u, self.s.steps - start)
                self.current = self.policy.collect(indices, gen, start, parts)
                if self._checkpoint_inside(start, parts):
                    storage.write_bytes(self.uri, save_safetensors(self.current.tensors()))
            else:
                self.current = self._read(start)
        return self.policy.loss(self.current, step - start)

    def _checkpoint_inside(self, start: int, parts: int) -> bool:
        every = self.s.checkpoint_every
        return any(m % every == 0 for m in range(start + 1, start + parts))

    def _read(self, start: int) -> grpo.Rollout:
        found = None
        if storage.exists(self.uri):
            found = grpo.Rollout.from_tensors(
                load_safetensors(storage.read_bytes(self.uri)), self.policy.device
            )
        if found is None or found.step != start:
            raise RuntimeError(
                f"resuming rlhf inside the rollout of step {start} needs {self.uri} "
                f"(it holds {'nothing' if found is None else f'step {found.step}'}); resume "
                "from a checkpoint at a multiple of rlhf.updates_per_rollout"
            )
        return found


def _slope(points: list[tuple[float, float]]) -> float | None:
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def reward_trends(rows: list[dict], heads: list[str]) -> dict:
    """The reward-hacking monitor: per-step slopes of the reward model's and the rater's
    scores on the same rollouts (weighted total and per head); ``diverging`` when the
    model's score rises while the rater's falls."""

    def pair(model_key: str, rater_key: str) -> dict:
        pts = [(r["step"], r[model_key], r[rater_key]) for r in rows
               if model_key in r and rater_key in r]  # fmt: skip
        m = _slope([(x, a) for x, a, _ in pts])
        v = _slope([(x, b) for x, _, b in pts])
        out = {"points": len(pts), "reward_model_slope": m, "rater_slope": v}
        out["diverging"] = None if m is None or v is None else bool(m > 0 and v < 0)
        return out

    total = pair("reward_monitored", "rater")
    total["heads"] = {h: pair(f"reward_{h}", f"rater_{h}") for h in heads}
    flagged = [h for h, v in total["heads"].items() if v["diverging"]]
    total["diverging_heads"] = flagged
    return total


def rlhf_task(cfg, pipeline, rt):
    s = cfg.rlhf
    pipeline.to(rt.device)
    train_prompts, held = prompt_sets(cfg)
    skip, why = skipped_heads(train_prompts + held)
    if s.reward_source == "judge":
        from pipelines.align.judge import Judge, JudgeReward

        frames = latent_shapes(pipeline.config, s.preferences.duration_s)[2]
        reward_model, report = JudgeReward(Judge(s.judge), pipeline, frames), {}
        # The judge answers only the heads it is asked; the others carry no reward.
        weights = tuple(w if h in s.judge.heads else 0.0
                        for h, w in zip(HEADS, s.head_weights, strict=True))  # fmt: skip
    elif s.reward_source == "rater":  # the ablation asks the probes: no reward model
        reward_model, report, weights = None, {}, tuple(s.head_weights)
    else:
        reward_model, reward_meta = ensure_reward_model(cfg, pipeline, rt)
        reward_model.to(rt.device)
        report = reward_meta["report"]
        weights = active_head_weights(s.head_weights, report["train_pairs"])
    if s.reward_source != "judge":  # the judge sees footage; the rater's world heads do not
        weights = tuple(0.0 if h in skip else w for h, w in zip(HEADS, weights, strict=True))
    if s.reward_source == "model":
        check_agreement_floor(report, weights, s.reward.min_agreement, s.reward.min_val_pairs)
    rows = [PromptRow(i, p) for i, p in enumerate(train_prompts)]
    tokens, mask = encode_prompts(pipeline, train_prompts)
    reference = None
    if s.kl_coefficient() > 0:
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
        skip_heads=skip,
        monitor=s.monitor_rater,
        rater_pool=rater_pool(s.rater_workers),
    )
    here = stage_uri(cfg, "rlhf")
    batch = RolloutSchedule(policy, s, here, rt.rank)

    def finish() -> dict:
        from pipelines.train.logs import METRICS_NAME

        if policy.rater_pool is not None:
            policy.rater_pool.shutdown()
        summary = {
            "head_weights": dict(zip(HEADS, weights, strict=True)),
            "kl_weight": s.kl_coefficient(),
            "updates_per_rollout": s.updates_per_rollout,
            "rater_skipped_heads": list(skip),
            "rater_skip_reason": why,
            "reward_source": s.reward_source,
            # Per head, on preference prompts the reward model never trained on.
            "reward_val_agreement": report.get("val_agreement"),
            "reward_held_out_prompts": (report.get("held_out") or {}).get("prompts"),
        }
        uri = storage.join(here, METRICS_NAME)
        logged = []
        if storage.exists(uri):
            logged = [json.loads(x) for x in storage.read_text(uri).splitlines()]
        if s.monitor_gradient and logged:
            summary["gradient_signal"] = signal = grpo.gradient_signal(logged)
            if "warning" in signal:
                print(f"rlhf: WARNING {signal['warning']}")
        if policy.monitor and s.reward_source != "rater" and logged:
            heads = [h for h, w in zip(HEADS, weights, strict=True) if w > 0 and h not in skip]
            trends = reward_trends(logged, heads)
            summary["reward_hacking"] = trends
            if trends["diverging"] or trends["diverging_heads"]:
                print(
                    "rlhf: WARNING reward hacking suspected: the reward model's score rises "
                    "while the rater's falls on the same rollouts: " + json.dumps(trends)
                )
        return summary

    groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": s.lr}]
    monitor = None
    if s.monitor_gradient:
        monitor = grpo.GradientMonitor(module.parameters(), s.updates_per_rollout)
    return StageTask("rlhf", module, ("dit",), s, rows, batch, groups, finish,
                     after_backward=monitor)  # fmt: skip


def distill_caption_pool(cfg) -> tuple[list[str], list[str]]:
    """(captions, held-out prompts) of DMD2 distillation: the training prompts, every
    other manifest caption and ``distill.extra_prompts``, less the held-out prompts."""
    from model.configs import get_config

    every = manifest_prompts(cfg.data, get_config(cfg.preset).fps)
    train, held = split_prompts(every, cfg.rlhf.prompts)
    captions = distill_prompts(train, held, cfg.distill.extra_prompts) + every
    return [p for p in dict.fromkeys(captions) if p not in set(held)], held


def distill_prompt_stream(cfg):
    """The DMD2 stage's prompt stream (its grammar pool, when configured, drawn from
    the run's seed: the same on every host that reads the same manifest)."""
    from pipelines.align import dmd

    captions, held = distill_caption_pool(cfg)
    d = cfg.distill.dmd
    return dmd.PromptStream(captions, held, d.grammar_fraction, d.grammar_pool, cfg.seed)


def distill_buckets(cfg, mcfg) -> tuple[int, ...]:
    """Clip lengths DMD2 draws from: ``distill.dmd.frame_buckets``, else every bucket
    the supervised stages trained on."""
    buckets = cfg.distill.dmd.frame_buckets or tuple(
        sorted({*cfg.data.frame_buckets, *cfg.pretrain.frame_buckets, *cfg.sft.frame_buckets})
    )
    for frames in buckets:
        mcfg.num_latent_frames(frames)  # a clear error for a length off the latent grid
    return tuple(buckets)


def real_clips(cfg, pipeline, held_out: frozenset[str], buckets, rt):
    """The manifest's kept clips as DMD2's real data (latents from the training cache,
    encoded here if missing), less those captioned with a held-out prompt or without a
    caption; every clip length the student is distilled at must have one."""
    from pipelines.align import dmd
    from pipelines.train.data import load_clip_rows
    from pipelines.train.latents import LatentStore

    mcfg = pipeline.config
    rows = load_clip_rows(cfg.data, mcfg.fps)
    store = LatentStore(ensure_latents(cfg, pipeline, rows, rt, cfg.data))
    # A clip without a caption is no sample of any prompt's distribution.
    rows = [r for r in rows if r.text.strip() and dmd.normalise(r.text) not in held_out]
    real = dmd.RealClips([r.bucket for r in rows], lambda i: store.get(rows[i].clip_id),
                         mcfg.audio_latents_per_video_latent)  # fmt: skip
    short = [f for f in buckets if not real.usable(f)]
    if short:
        raise ValueError(
            f"distill.dmd.gan_weight: no captioned clip of the manifest {cfg.data.curated_uri} "
            f"(held-out prompts' clips left out) is at least {short} frames long; the student is "
            f"distilled at {list(buckets)} (distill.dmd.frame_buckets)"
        )
    return real


def dmd_task(cfg, pipeline, rt):
    import copy

    from pipelines.align import dmd

    s = cfg.distill
    pipeline.to(rt.device)
    stream = distill_prompt_stream(cfg)
    if stream.pool and rt.is_main:
        uri = storage.join(stage_uri(cfg, "distill"), GRAMMAR_POOL_NAME)
        storage.write_text(uri, "\n".join(stream.pool) + "\n")
    mcfg = pipeline.config
    buckets = distill_buckets(cfg, mcfg)
    # Teacher and fake score start as the parent (rlhf) weights; on resume the fake
    # score's trained weights come back from the checkpoint (a training-only component).
    teacher = copy.deepcopy(pipeline.dit).eval().requires_grad_(False)
    gan = s.dmd.gan_weight > 0
    # Before the pair is put in training mode: encoding a missing cache sets eval mode.
    real = real_clips(cfg, pipeline, stream.held_out, buckets, rt) if gan else None
    critic = dmd.critic_head(pipeline.dit, s.dmd.classifier_hidden) if gan else None
    pair = dmd.DMDPair(pipeline.dit, copy.deepcopy(pipeline.dit), critic)
    pair.to(rt.device).train()
    parallelize_dit(pair.dit, cfg.parallel)
    parallelize_dit(pair.fake_score, cfg.parallel)
    module = pair
    if rt.distributed and not cfg.parallel.fsdp:
        # One network gets gradients per step: the other's parameters go unused.
        module = torch.nn.parallel.DistributedDataParallel(pair, find_unused_parameters=True)
    step_fn = dmd.DMD2(s, module, pair, teacher, pipeline.text_encoder, mcfg, buckets, stream,
                       rt.device)  # fmt: skip
    step_fn.real = real
    if s.dmd.regression_weight > 0 and s.dmd.regression_pairs > 0:
        # Drawn once (seeded) by the main worker and kept: a resumed run reads them back.
        uri = storage.join(stage_uri(cfg, "distill"), DMD_PAIRS_NAME)
        if rt.is_main and not storage.exists(uri):
            began = time.perf_counter()
            pairs = dmd.teacher_pairs(step_fn, s.dmd.regression_pairs, cfg.seed,
                                      s.dmd.regression_pairs_batch)  # fmt: skip
            storage.write_bytes(uri, dmd.pairs_to_bytes(pairs))
            took = time.perf_counter() - began
            print(f"distill: {s.dmd.regression_pairs} regression pairs drawn in {took:.0f} s "
                  f"({took / s.dmd.regression_pairs:.3f} s a pair)", flush=True)  # fmt: skip
        rt.barrier()
        step_fn.pairs = dmd.pairs_from_bytes(storage.read_bytes(uri))
        want = dmd.pairs_per_bucket(s.dmd.regression_pairs, buckets)
        found = {f: len(p["prompts"]) for f, p in step_fn.pairs.items()}
        if found != dict.fromkeys(buckets, want):
            raise ValueError(
                f"{uri} holds regression pairs {found} (clip length: count), not {want} for "
                f"each of {list(buckets)} as distill.dmd.regression_pairs and the frame "
                "buckets ask: delete it to draw them again"
            )
    rows = [dmd.PromptSlot(i) for i in range(s.batch_size * rt.world_size)]
    groups = [
        {"params": [p for p in pair.dit.parameters() if p.requires_grad], "lr": s.dmd.lr},
        {"params": [p for p in pair.fake_score.parameters() if p.requires_grad],
         "lr": s.dmd.fake_lr},
    ]  # fmt: skip
    components = ("dit", "fake_score")
    if gan:
        groups.append({"params": list(critic.parameters()), "lr": s.dmd.fake_lr})
        components += ("critic",)
    task = StageTask("distill", module, components, s, rows, step_fn, groups, None)
    task.final_extra = {
        "fast": {
            **_fast_metadata(s),
            "method": "dmd2",
            "fake_updates": s.dmd.fake_updates,
            "regression_weight": s.dmd.regression_weight,
            "regression_pairs": s.dmd.regression_pairs,
            "gan_weight": s.dmd.gan_weight,
            "classifier_weight": s.dmd.classifier_weight,
            "real_clips": len(real.lengths) if gan else 0,
            "frame_buckets": list(buckets),
            # Text-to-audio-video only: references, multi-shot and V2V are not
            # distilled, and the Fast deployment refuses them (serve fast.unsupported_modes).
            "modes": ["t2av"],
        }
    }
    return task


def distill_task(cfg, pipeline, rt):
    from pipelines.align import distill

    s = cfg.distill
    if s.method == "dmd2":
        return dmd_task(cfg, pipeline, rt)
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
            **_fast_metadata(s),
            "teacher_steps": s.teacher_steps,
            "method": "reflow on guided teacher couplings",
        }
    }
    return task


def _fast_metadata(s) -> dict:
    """What every Fast student records for serving, whichever method distilled it."""
    return {
        "steps": list(s.student_steps),
        "default_steps": s.default_steps,
        "sampler": s.dmd.sampler if s.method == "dmd2" else "euler",
        # 0: the resolution shift (reflow's grid follows it).
        "time_shift": s.dmd.time_shift if s.method == "dmd2" else 0.0,
        "guidance": "distilled",
        "teacher_text_scale": s.text_scale,
    }


def align_task(cfg, stage: str, pipeline, rt):
    if stage == "rlhf":
        return rlhf_task(cfg, pipeline, rt)
    if stage == "distill":
        return distill_task(cfg, pipeline, rt)
    raise ValueError(f"not an alignment stage: {stage!r}")
