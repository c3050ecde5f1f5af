"""The training loop: one stage of ``vae -> pretrain -> sft``, Ray-free at its core.

:func:`run_stage` builds the pipeline (fresh, or from the parent stage's final
checkpoint), applies parallelism from outside (DDP, or FSDP2 through
``model.parallelize``), resumes from the newest checkpoint if there is one, and runs
the stage's loss for its steps. It checkpoints every ``checkpoint_every`` steps and
writes ``RUN/<stage>/final/`` (EMA weights swapped in) at the end. The same function
runs in one process, under torchrun, and as each Ray Train worker
(:mod:`pipelines.train.ray_train`); only the :class:`Runtime` differs.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core import storage
from core.config import config_to_dict
from model.checkpoint import CheckpointError, read_meta, save_state
from model.discriminators import AudioDiscriminator, PatchDiscriminator
from model.ema import ema_update
from model.flow_matching import add_noise, resolution_shift, sample_timesteps, velocity_target
from model.parallelize import apply_ddp, parallelize_dit
from model.pipeline import DuetPipeline
from model.video_vae import ReconLossWeights, motion_map, pick_crop, standout_map
from pipelines.train import state as ckpt
from pipelines.train.batches import BatchBuilder, DiTBatch
from pipelines.train.config import (
    PARENT_STAGE,
    DiTStageConfig,
    TrainConfig,
    VAEStageConfig,
    stage_data,
)
from pipelines.train.data import (
    ClipRow,
    EpochSampler,
    SamplerPosition,
    data_version,
    decode_clip,
    has_dialogue,
    load_clip_rows,
    sft_subset,
)
from pipelines.train.latents import LatentStore
from pipelines.train.logs import MetricsLog
from pipelines.train.reference_pairs import load_pairs
from pipelines.train.runtime import Runtime
from pipelines.train.sequences import sequence_batches
from pipelines.train.task import (
    StageTask,
    ensure_latents,
    final_uri,
    latent_cache_uri,
    stage_done,
    stage_uri,
)
from pipelines.train.vocabulary import VOCABULARY_KEY, checkpoint_vocabulary, vocabulary_of

Progress = Callable[[str, int, int, dict], None]


class TrainError(RuntimeError):
    """A stage cannot run: its parent is missing, or the config does not fit the data."""


def step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    """The RNG of one step on one rank: a pure function of its coordinates."""
    salt = sum((i + 1) * ord(c) for i, c in enumerate(stage))
    return torch.Generator().manual_seed(((seed * 7919 + salt) * 1_000_003 + step) * 1009 + rank)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes (DDP, compile, checkpoint wrappers)."""
    for wrapper in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


# ---------------------------------------------------------------------------------
# Stage tasks: what is trained, on what, with which loss.


class VAEPair(nn.Module):
    """Both VAEs (and optionally the vocoder) as one module, so DDP sees one forward.

    With GAN terms on (``vae.vocoder_gan_start``, ``vae.video_gan_start``) it also
    holds the discriminators, as training-only components (``audio_disc``,
    ``video_disc``): checkpointed for resume, never part of the final pipeline.
    """

    def __init__(self, pipeline: DuetPipeline, with_vocoder: bool, settings: VAEStageConfig):
        super().__init__()
        self.video_vae = pipeline.video_vae
        self.audio_vae = pipeline.audio_vae
        self.vocoder = pipeline.vocoder if with_vocoder else None
        self.settings = settings
        # No discriminator when the GAN never starts within the stage (short runs).
        gan_audio = with_vocoder and 0 <= vocoder_gan_start(settings) < settings.steps
        self.audio_disc = AudioDiscriminator() if gan_audio else None
        self.video_disc = PatchDiscriminator() if settings.video_gan_start >= 0 else None

    def gan_components(self) -> tuple[str, ...]:
        return tuple(n for n in ("audio_disc", "video_disc") if getattr(self, n) is not None)

    def forward(self, windows, audio, has_audio, gen, step: int = 0, speech=None):
        """``speech``: (B', C, N') clips with dialogue the vocoder also trains on
        (``vae.vocoder_speech_share``), or None."""
        s = self.settings
        video_disc = self.video_disc if 0 <= s.video_gan_start <= step else None
        loss_v, parts = self.video_vae.loss(windows, recon_weights(s), gen, video_disc)
        metrics = {"video_loss": float(loss_v.detach())}
        metrics |= {f"video_{k}": v for k, v in parts.items() if k not in ("recon", "kl")}
        loss = loss_v
        if bool(has_audio.any()):
            loss_a, _ = self.audio_vae.loss(
                audio_vae_batch(audio[has_audio], speech, s), s.kl_weight, gen
            )
            loss = loss + loss_a
            metrics["audio_loss"] = float(loss_a.detach())
            if self.vocoder is not None:
                # After the VAEs' losses: their noise stream is what it was.
                loss_voc, vparts = vocoder_loss(
                    self.vocoder, self.audio_disc, self.audio_vae, audio[has_audio], s, gen, step,
                    speech,
                )  # fmt: skip
                loss = loss + loss_voc
                metrics["vocoder_loss"] = float(loss_voc.detach())
                metrics |= {f"vocoder_{k}": v for k, v in vparts.items()}
        return loss, metrics


def audio_vae_batch(audio: torch.Tensor, speech, s: VAEStageConfig) -> torch.Tensor:
    """(B, C, N) clips the audio VAE reconstructs: the batch's, and with
    ``audio_vae_speech`` the step's clips with dialogue too (all cut to one length)."""
    if not s.audio_vae_speech or speech is None or not len(speech):
        return audio
    n = min(audio.shape[-1], speech.shape[-1])
    return torch.cat([audio[..., :n], speech[..., :n]])


def recon_weights(s: VAEStageConfig) -> ReconLossWeights:
    return ReconLossWeights(s.kl_weight, s.motion_weight, s.standout_weight, s.video_gan_weight)


def vocoder_gan_start(s: VAEStageConfig) -> int:
    """The stage step the vocoder's GAN starts at (-1 = never): ``vocoder_gan_start``
    when set, else the last ``vocoder_gan_fraction`` of the stage's steps."""
    if s.vocoder_gan_start is not None:
        return s.vocoder_gan_start
    gan_steps = int(s.vocoder_gan_fraction * s.steps)
    return s.steps - gan_steps if gan_steps > 0 else -1


def vocoder_gan_weight(s: VAEStageConfig, step: int) -> float:
    """The adversarial weight on the vocoder at ``step`` (0 = the GAN is off)."""
    start = vocoder_gan_start(s)
    if start < 0 or step < start:
        return 0.0
    return s.vocoder_gan_weight * min(1.0, (step - start + 1) / max(1, s.vocoder_gan_ramp_steps))


def vocoder_segments(
    audio: torch.Tensor, s: VAEStageConfig, audio_vae, gen, count: int | None = None
) -> torch.Tensor:
    """(B, C, N) clips -> (count, L) random mono segments of ``s.vocoder_segment_s``
    (clamped to N) starting on the audio latent grid; ``count`` defaults to
    ``s.vocoder_segments``; with 0 segments, every channel whole (B*C, N). Positions
    come from ``gen`` (the step's seeded per-rank generator), never the global RNG, so
    a resumed run repeats them."""
    flat = audio.flatten(0, 1)  # (B*C, N): every channel is a mono training signal
    if s.vocoder_segments <= 0:
        return flat
    spl = audio_vae.samples_per_latent
    n = flat.shape[-1]
    length = min(n, max(spl, int(s.vocoder_segment_s * audio_vae.sample_rate) // spl * spl))
    k = s.vocoder_segments if count is None else count
    rows = torch.randint(flat.shape[0], (k,), generator=gen)
    starts = spl * torch.randint((n - length) // spl + 1, (k,), generator=gen)
    return torch.stack(
        [flat[r, o : o + length] for r, o in zip(rows.tolist(), starts.tolist(), strict=True)]
    )


def speech_segment_count(s: VAEStageConfig) -> int:
    """How many of a step's vocoder segments come from clips with dialogue."""
    if s.vocoder_segments <= 0:
        return 0
    return round(s.vocoder_speech_share * s.vocoder_segments)


def vocoder_training_audio(
    audio: torch.Tensor, speech: torch.Tensor | None, s: VAEStageConfig, audio_vae, gen
) -> torch.Tensor:
    """The step's mono training segments: ``speech_segment_count`` of them from
    ``speech`` (clips with dialogue) when given, the rest from the batch's ``audio``,
    cut to one length."""
    k_speech = speech_segment_count(s) if speech is not None and len(speech) else 0
    if k_speech == 0:
        return vocoder_segments(audio, s, audio_vae, gen)
    parts = [vocoder_segments(speech, s, audio_vae, gen, k_speech)]
    if s.vocoder_segments > k_speech and len(audio):
        parts.insert(0, vocoder_segments(audio, s, audio_vae, gen, s.vocoder_segments - k_speech))
    length = min(p.shape[-1] for p in parts)
    return torch.cat([p[:, :length] for p in parts])


def vocoder_loss(
    vocoder, audio_disc, audio_vae, audio, s: VAEStageConfig, gen, step: int, speech=None
):
    """The stage's vocoder loss on (B, C, N) clips at ``step``: mel + MR-STFT on random
    segments (some from ``speech``, clips with dialogue, when given), plus the GAN
    terms in its last steps (``audio_disc``, when it exists)."""
    wav = vocoder_training_audio(audio, speech, s, audio_vae, gen)
    weight = vocoder_gan_weight(s, step)
    disc = audio_disc if weight > 0 else None
    loss, metrics = vocoder.loss(wav, audio_vae.mel, disc, weight)
    if speech is not None:
        metrics["speech_segments"] = speech_segment_count(s)
    return loss, metrics


def _window(video: torch.Tensor, s: VAEStageConfig, tf: int, sf: int, gen) -> torch.Tensor:
    """A random ``1 + tf*j`` frame window on the latent grid of a (3, T, H, W) clip,
    optionally cropped (``s.crop_px``; the most moving of ``s.crop_candidates`` crops)."""
    t = video.shape[1]
    frames = min(s.window_frames, t)
    frames = 1 + tf * ((frames - 1) // tf)
    start = tf * int(torch.randint(0, (t - frames) // tf + 1, (1,), generator=gen))
    clip = video[:, start : start + frames]
    if s.crop_px:
        motion = motion_map(video)[start : start + frames] if s.crop_candidates > 1 else clip[0]
        y, x = pick_crop(motion, s.crop_px, sf, s.crop_candidates, gen)
        clip = clip[:, :, y : y + s.crop_px, x : x + s.crop_px]
    return clip


# The five RGB orders other than the identity.
COLOUR_ORDERS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def permute_colours(clip: torch.Tensor, p: float, gen) -> torch.Tensor:
    """(3, ...) -> the same with its channels in another RGB order, with probability
    ``p`` (no random draw at all when ``p`` is 0, so recipes without it keep their
    random streams)."""
    if p <= 0.0 or float(torch.rand((), generator=gen)) >= p:
        return clip
    order = COLOUR_ORDERS[int(torch.randint(len(COLOUR_ORDERS), (1,), generator=gen))]
    return clip[list(order)]


class DecodedClips:
    """Per-worker decode cache for the VAE stage (a bounded LRU of decoded clips)."""

    def __init__(self, pipeline: DuetPipeline, max_clips: int = 256):
        self.pipeline = pipeline
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_clips = max_clips

    def get(self, row: ClipRow) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self.cache.pop(row.clip_id, None)
        if hit is None:
            hit = decode_clip(row, self.pipeline)
        self.cache[row.clip_id] = hit
        while len(self.cache) > self.max_clips:
            self.cache.pop(next(iter(self.cache)))
        return hit


def vae_task(cfg: TrainConfig, pipeline: DuetPipeline, rt: Runtime) -> StageTask:
    s: VAEStageConfig = cfg.vae
    rows = load_clip_rows(cfg.data, pipeline.config.fps)
    if s.decoders_only:
        if not cfg.init_from:
            raise TrainError(
                "vae.decoders_only keeps the encoders of a trained checkpoint: set init_from"
            )
        # Before DDP wraps the pair: it leaves frozen parameters out of its reducer.
        pipeline.video_vae.encoder.requires_grad_(False)
        pipeline.audio_vae.encoder.requires_grad_(False)
    pair = VAEPair(pipeline, with_vocoder=s.vocoder_steps > 0, settings=s)
    pair.to(rt.device)
    module: nn.Module = pair
    if rt.distributed:
        # Clips without sound leave the audio VAE without a gradient on some steps.
        module = nn.parallel.DistributedDataParallel(pair, find_unused_parameters=True)
    decoded = DecodedClips(pipeline)
    mcfg = pipeline.config
    tf, sf = mcfg.video_vae.temporal_factor, mcfg.video_vae.spatial_factor
    stream = None
    if rt.under_ray and cfg.data.stream_with_ray_data:
        from pipelines.train.stream import DecodedClipStream

        sampler = EpochSampler(rows, s.batch_size, rt.world_size, cfg.seed)
        stream = DecodedClipStream(rows, sampler, rt.rank, mcfg, cfg.data.decode_cpus)

    dialogue = [i for i, r in enumerate(rows) if r.has_audio and has_dialogue(r.text)]
    speech_clips = speech_segment_count(s) if pair.vocoder is not None and dialogue else 0

    def speech_audio(step: int) -> torch.Tensor | None:
        """Clips with dialogue for the vocoder, drawn with a generator of their own
        (the VAEs' windows and noise stay as they were without them)."""
        if speech_clips == 0:
            return None
        draw = step_generator(cfg.seed, "vae/speech", step, rt.rank)
        picks = torch.randint(len(dialogue), (speech_clips,), generator=draw).tolist()
        sounds = [decoded.get(rows[dialogue[i]])[1] for i in picks]
        n = min(a.shape[-1] for a in sounds)
        return torch.stack([a[..., :n] for a in sounds])

    def batch(indices, gen, step):
        if stream is not None:
            clips = stream.take(indices)
        else:
            clips = [decoded.get(rows[i]) for i in indices]
        windows = torch.stack(
            [permute_colours(_window(v, s, tf, sf, gen), s.colour_permute, gen) for v, _ in clips]
        )
        audio = torch.stack([a for _, a in clips])
        has_audio = torch.tensor([rows[i].has_audio for i in indices])
        speech = speech_audio(step)
        if speech is not None:
            speech = speech.to(rt.device)
        loss, metrics = module(
            windows.to(rt.device), audio.to(rt.device), has_audio, gen, step, speech
        )
        return loss, metrics, int(windows[0].numel() // 3)

    groups = [
        {"params": _trainable(pair.video_vae), "lr": s.lr},
        {"params": _trainable(pair.audio_vae), "lr": s.audio_lr},
    ]
    if pair.vocoder is not None:
        groups.append({"params": list(pair.vocoder.parameters()), "lr": s.audio_lr})
    for name in pair.gan_components():
        groups.append({"params": list(getattr(pair, name).parameters()), "lr": s.disc_lr})

    def finish() -> dict:
        return finish_vae(cfg, pipeline, rows, decoded, rt)

    components = ("video_vae", "audio_vae") + (("vocoder",) if pair.vocoder is not None else ())
    components += pair.gan_components()
    start = stream.start if stream is not None else None
    # One param group per network, in ``components`` order; each clipped alone.
    return StageTask(
        "vae", module, components, s, rows, batch, groups, finish, start, clip_groups=components
    )


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def finish_vae(cfg, pipeline: DuetPipeline, rows, decoded: DecodedClips, rt: Runtime) -> dict:
    """Latent calibration (same clips on every rank) and held-out reconstruction quality."""
    pipeline.eval()
    if not cfg.vae.decoders_only:  # else the latents, their scale included, stay as they were
        calib = rows[: min(len(rows), 16)]
        pipeline.video_vae.calibrate([decoded.get(r)[0][None].to(rt.device) for r in calib])
        with_audio = [r for r in calib if r.has_audio] or calib
        audio = [decoded.get(r)[1][None].to(rt.device) for r in with_audio]
        pipeline.audio_vae.calibrate(audio)
    # Decode with the vocoder only where this stage trained it (it saw sound);
    # otherwise the pipeline keeps what it had (Griffin-Lim for a fresh one).
    if cfg.vae.vocoder_steps > 0 and any(r.has_audio for r in rows):
        pipeline.use_neural_vocoder = True
    try:
        held_out = load_clip_rows(cfg.data, pipeline.config.fps, split="val")
    except Exception:  # no val split: measure on training clips and say so
        held_out = []
    source = "val" if held_out else "train"
    eval_rows = (held_out or rows)[: cfg.vae.eval_clips]
    psnrs, mels = [], []
    for row in eval_rows:
        video, audio = decoded.get(row)
        rec = pipeline.video_vae.decode(pipeline.video_vae.encode(video[None].to(rt.device)))[0]
        mse = F.mse_loss(rec.clamp(-1, 1).cpu(), video).item()
        psnrs.append(10 * math.log10(4.0 / max(mse, 1e-12)))  # range [-1, 1]: peak-to-peak 2
        if row.has_audio:
            mel = pipeline.audio_vae.waveform_to_mel(audio[None].to(rt.device))
            z = pipeline.audio_vae.encode(audio[None].to(rt.device))
            mel_rec = pipeline.audio_vae.decode_mel(z)
            n = min(mel.shape[-1], mel_rec.shape[-1])
            mels.append(float((mel[..., :n] - mel_rec[..., :n]).abs().mean()))
    return {
        "eval_split": source,
        "eval_clips": len(eval_rows),
        "psnr_db": sum(psnrs) / len(psnrs) if psnrs else float("nan"),
        "mel_l1": sum(mels) / len(mels) if mels else float("nan"),
    }


def dataset_pairs(data) -> list:
    """The dataset's reference pairs; kinds it cannot pair are said once, with why."""
    from pipelines.train.data import clips_table_uri, read_clips_table

    uri = data.curated_uri
    pairs, skipped = load_pairs(clips_table_uri(uri), read_clips_table(uri))
    for reason in skipped:
        logging.getLogger(__name__).warning("reference pairs: no %s", reason)
    return pairs


def dit_task(cfg: TrainConfig, stage: str, pipeline: DuetPipeline, rt: Runtime) -> StageTask:
    s: DiTStageConfig = cfg.stage(stage)
    mcfg = pipeline.config
    data = stage_data(cfg, stage)
    all_rows = load_clip_rows(data, mcfg.fps)
    global_batch = s.batch_size * rt.world_size
    if stage != "pretrain":
        rows = sft_subset(all_rows, data.sft_top_fraction, min_rows=global_batch)
    else:
        rows = all_rows
    pipeline.to(rt.device)
    store = LatentStore(ensure_latents(cfg, pipeline, all_rows, rt, data))
    dit = pipeline.dit
    dit.train()
    module: nn.Module = parallelize_dit(dit, cfg.parallel)
    if rt.distributed and not cfg.parallel.fsdp:
        # The DiT gives every parameter a gradient each step (zero for absent
        # reference slots), so DDP needs no search for unused parameters.
        module = apply_ddp(module)
    d = mcfg.dit
    builder = BatchBuilder(
        rows,
        all_rows,
        store,
        s.references,
        mcfg.text.max_tokens,
        (d.max_image_refs, d.max_video_refs, d.max_audio_refs),
        d.ref_time_stride,
        mcfg.audio_latents_per_video_latent,
        # Role pairs (the pair table, else other shots of each source) and the
        # @-binding tokens of each role reference, as generation encodes them.
        pairs=dataset_pairs(data),
        binder=lambda phrase: pipeline.text_encoder.embed_tokens(phrase),
    )
    # Multi-shot footage (continuous sequences of 2..N shots), encoded once each
    # (not at all when the stage takes no multi-shot steps).
    sequences = sequence_batches(
        pipeline, data.curated_uri, data.split, latent_cache_uri(cfg, pipeline, data),
        cfg.data.latent_shard_clips, rt, enabled=s.references.multishot_probability > 0,
    )  # fmt: skip
    flow = mcfg.flow

    def batch(indices, gen, step):
        shared = step_generator(cfg.seed, stage + "/shared", step, 0)  # same on every rank
        multishot = (
            len(sequences) > 0
            and float(torch.rand(1, generator=shared)) < s.references.multishot_probability
        )
        if multishot:
            b = sequences.build(len(indices), gen)
        else:
            b = builder.build(indices, gen)
        loss, metrics = dit_loss(module, b, flow, mcfg.dit.video_patch, gen, rt.device, s)
        if b.i2v is not None:
            metrics["i2v"] = float(b.i2v.float().mean())
            metrics["bound"] = sum(bool(x) for x in b.bindings) / len(b.bindings)
        metrics["multishot"] = float(bool(multishot))
        tokens = b.video[0, 0].numel() // mcfg.dit.video_patch**2 + b.audio.shape[-1]
        return loss, metrics, int(tokens)

    groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": s.lr}]
    return StageTask(stage, module, ("dit",), s, rows, batch, groups, None)


@dataclass
class BranchTimes:
    """Flow times of one batch: (B,) each, and which samples have a clean branch."""

    video: torch.Tensor
    audio: torch.Tensor
    clean_video: torch.Tensor  # (B,) bool: video given at t = 0, its loss masked
    clean_audio: torch.Tensor


def branch_times(
    bsz: int,
    flow,
    shift: float,
    has_audio: torch.Tensor,
    gen: torch.Generator,
    independent: float = 0.0,
    clean: float = 0.0,
) -> BranchTimes:
    """A flow time per branch: shared, except that with probability ``independent``
    the audio's is drawn on its own, and with probability ``clean`` (clips with sound
    only: a silent clip's audio teaches nothing to condition on) one branch, video or
    audio at even odds, is clean at t = 0."""
    for name, p in (("independent_time_probability", independent), ("clean_branch_probability", clean)):  # fmt: skip
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    t_v = sample_timesteps(bsz, flow, shift, gen)
    own = sample_timesteps(bsz, flow, shift, gen)
    t_a = torch.where(torch.rand(bsz, generator=gen) < independent, own, t_v)
    one_clean = (torch.rand(bsz, generator=gen) < clean) & has_audio.bool().cpu()
    audio_side = torch.rand(bsz, generator=gen) < 0.5
    clean_v, clean_a = one_clean & ~audio_side, one_clean & audio_side
    zero = torch.zeros(())
    return BranchTimes(
        torch.where(clean_v, zero, t_v), torch.where(clean_a, zero, t_a), clean_v, clean_a
    )


def dit_loss(module, b: DiTBatch, flow, patch: int, gen, device, stage=None):
    """Rectified-flow loss on both branches, each at its own flow time
    (:func:`branch_times`, rates from the stage config); audio counts only where the
    clip has sound, and a clean (given) branch does not count."""
    bsz = b.video.shape[0]
    x0v, x0a = b.video.to(device), b.audio.to(device)
    nv = torch.randn(x0v.shape, generator=gen).to(device)
    na = torch.randn(x0a.shape, generator=gen).to(device)
    num_tokens = x0v.shape[2] * (x0v.shape[3] // patch) * (x0v.shape[4] // patch) + x0a.shape[2]
    shift = resolution_shift(num_tokens, flow)
    drop = (torch.rand(bsz, generator=gen) < flow.text_dropout) | b.text_missing
    times = branch_times(
        bsz, flow, shift, b.has_audio, gen,
        getattr(stage, "independent_time_probability", 0.0),
        getattr(stage, "clean_branch_probability", 0.0),
    )  # fmt: skip
    t_v, t_a = times.video.to(device), times.audio.to(device)
    text = type(b.text)(
        b.text.tokens.to(device),
        b.text.mask.to(device),
        None if b.text.shot_ids is None else b.text.shot_ids.to(device),
    )
    refs = _refs_to(b.references, device)
    pred_v, pred_a = module(
        add_noise(x0v, nv, t_v),
        add_noise(x0a, na, t_a),
        (t_v, t_a),
        text,
        refs,
        b.shots,
        text_drop=drop.to(device),
    )
    err_v = (pred_v.float() - velocity_target(x0v, nv).float()) ** 2  # (B, Cv, T, h, w)
    per_sample_v = weighted_mean(
        err_v, latent_standout(x0v, getattr(stage, "standout_weight", 0.0))
    )
    weight_v = (~times.clean_video).to(device).float()
    loss_v = (per_sample_v * weight_v).sum() / weight_v.sum().clamp_min(1.0)
    per_sample_a = ((pred_a.float() - velocity_target(x0a, na).float()) ** 2).flatten(1).mean(1)
    weight_a = (b.has_audio.to(device).bool() & ~times.clean_audio.to(device)).float()
    loss_a = (per_sample_a * weight_a).sum() / weight_a.sum().clamp_min(1.0)
    loss = loss_v + flow.audio_loss_weight * loss_a
    metrics = {
        "video_loss": float(loss_v.detach()),
        "audio_loss": float(loss_a.detach()),
        "clean_video": float(times.clean_video.float().mean()),
        "clean_audio": float(times.clean_audio.float().mean()),
    }
    return loss, metrics


def latent_standout(x0v: torch.Tensor, weight: float) -> torch.Tensor | None:
    """(B, 1, T, h, w) loss weights 1 + weight * (distance of each latent position
    from its frame's median latent, largest over channels); None when weight is 0."""
    if weight <= 0:
        return None
    return 1.0 + weight * standout_map(x0v.float())


def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(B, C, ...) -> (B,): the mean over all but the batch, weighted per position."""
    if weight is None:
        return err.flatten(1).mean(1)
    w = weight.expand_as(err)
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)


def _refs_to(refs, device):
    if refs is None:
        return None
    from model.references import ReferenceLatents, RefSlot

    def move(slot):
        if slot is None:
            return None
        present = None if slot.present is None else slot.present.to(device)
        return RefSlot(slot.latent.to(device), present)

    return ReferenceLatents(
        [move(s) for s in refs.images],
        [move(s) for s in refs.videos],
        [move(s) for s in refs.audios],
    )


# ---------------------------------------------------------------------------------
# The loop.


def parent_checkpoint(cfg: TrainConfig, stage: str) -> str | None:
    if cfg.init_from:
        return cfg.init_from
    parent = PARENT_STAGE[stage]
    if parent is None:
        return None
    uri = final_uri(cfg, parent)
    if not stage_done(cfg, parent):
        raise TrainError(f"stage {stage!r} needs {parent!r} first: no final checkpoint at {uri}")
    return uri


def build_pipeline(cfg: TrainConfig, stage: str) -> tuple[DuetPipeline, str]:
    parent = parent_checkpoint(cfg, stage)
    if parent is None:
        torch.manual_seed(cfg.seed)  # fresh weights: the same on every rank
        return DuetPipeline.from_preset(cfg.preset, seed=cfg.seed), ""
    pipeline = DuetPipeline.from_checkpoint(parent)
    if pipeline.config.name != cfg.preset:
        raise CheckpointError(
            f"{parent} holds preset {pipeline.config.name!r}, but the config asks for "
            f"{cfg.preset!r}"
        )
    return pipeline, parent


def _named_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {clean_fqn(n): p for n, p in module.named_parameters() if p.requires_grad}


def _maybe_kill(cfg: TrainConfig, stage: str, step: int, rt: Runtime) -> None:
    if (cfg.debug_kill_at_step, cfg.debug_kill_rank, cfg.debug_kill_stage) != (
        step,
        rt.rank,
        stage,
    ):
        return
    marker = storage.join(stage_uri(cfg, stage), f"killed_at_{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"rank {rt.rank} pid {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class StageResult:
    stage: str
    steps: int
    resumed_from: str
    final_uri: str
    metrics: dict
    wall_s: float
    losses: list[tuple[int, float]]


def check_fits(cfg: TrainConfig, pipeline: DuetPipeline, stage: str) -> None:
    """Config errors that would otherwise surface after minutes of decoding (``stage``:
    the one about to run, for its own settings' checks)."""
    mcfg = pipeline.config
    buckets = {"data": cfg.data.frame_buckets}
    for name in ("pretrain", "sft"):
        buckets[name] = cfg.stage(name).frame_buckets
    for where, frames_list in buckets.items():
        for frames in frames_list:
            try:
                mcfg.num_latent_frames(frames)
            except ValueError as err:
                raise TrainError(f"{where}.frame_buckets: {err} (model {mcfg.name!r})") from err
    s = cfg.vae
    if s.crop_px and (
        s.crop_px % mcfg.video_vae.spatial_factor or s.crop_px > min(mcfg.width, mcfg.height)
    ):
        raise TrainError(
            f"vae.crop_px {s.crop_px} must be a multiple of {mcfg.video_vae.spatial_factor} "
            f"within {mcfg.width}x{mcfg.height}"
        )
    if s.crop_candidates < 1:
        raise TrainError(
            f"vae.crop_candidates must be >= 1 (1 = uniform crops), got {s.crop_candidates}"
        )
    gan = stage == "distill" and cfg.distill.method == "dmd2" and cfg.distill.dmd.gan_weight > 0
    if cfg.parallel.fsdp and gan:
        raise TrainError(
            "distill.dmd.gan_weight needs parallel.fsdp = false (DDP): the student's GAN "
            "term runs the fake score with its weights detached, which FSDP2's sharded "
            "weights do not allow"
        )
    if cfg.parallel.fsdp and not torch.distributed.is_initialized():
        raise TrainError("parallel.fsdp needs several workers (Ray Train or torchrun)")


def run_stage(
    cfg: TrainConfig, stage: str, rt: Runtime, progress: Progress | None = None
) -> StageResult:
    """Train one stage to its configured step count (resuming if a checkpoint exists)."""
    started = time.perf_counter()
    pipeline, parent = build_pipeline(cfg, stage)
    check_fits(cfg, pipeline, stage)
    version = data_version(cfg.data.curated_uri)
    here = stage_uri(cfg, stage)
    restored = rt.restored_checkpoint()
    resume = restored or ckpt.latest_checkpoint(here)
    if resume:  # a corrupt or foreign checkpoint fails here, before any decoding
        opened = ckpt.open_checkpoint(resume)
        found = opened[0]
        if found.stage != stage:
            raise CheckpointError(f"{resume} is a {found.stage!r} checkpoint, not {stage!r}")
    task = stage_task(cfg, stage, pipeline, rt)
    s = task.settings
    sampler = EpochSampler(task.rows, s.batch_size, rt.world_size, cfg.seed)
    # foreach: one multi-tensor kernel per update instead of ~10 small ops per
    # parameter (PyTorch picks it only on CUDA by default; on CPU the per-tensor loop
    # was ~8% of a tiny step).
    optimizer = torch.optim.AdamW(
        task.param_groups, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.99), foreach=True
    )
    params = _named_trainable(task.module)
    ema = {n: p.detach().clone() for n, p in params.items()} if s.ema_decay > 0 else None
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    state = ckpt.TrainState(
        stage=stage, seed=cfg.seed, parent=parent, data_version=version, config=config_to_dict(cfg)
    )
    if resume:
        state = ckpt.restore_checkpoint(
            resume, task.components, task.module, optimizer, ema, opened
        )
        if restored:
            rt.release_restored(restored)
    log = MetricsLog(here, enabled=rt.is_main, resume_step=state.step)
    position = SamplerPosition(state.epoch, state.batch)
    if task.start is not None:
        task.start(position, s.steps - state.step)
    window: list[dict] = []
    losses: list[tuple[int, float]] = []
    task.module.train()
    tick = time.perf_counter()
    tokens_since = 0
    while state.step < s.steps:
        step = state.step
        _maybe_kill(cfg, stage, step, rt)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr_at(step, s.steps, base, s.warmup_steps)
        indices, position = sampler.next(position, rt.rank)
        if cfg.record_samples and rt.is_main:
            epoch, batch = (position.epoch, position.batch - 1)
            global_batch = sampler.epoch_batches(epoch)[batch]
            log.add_samples(step + 1, epoch, batch, [task.rows[i].clip_id for i in global_batch])
        gen = step_generator(cfg.seed, stage, step, rt.rank)
        with torch.autocast(rt.device.type, torch.bfloat16, enabled=cfg.parallel.autocast):
            loss, metrics, tokens = task.batch_fn(indices, gen, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if task.after_backward is not None:
            metrics = {**metrics, **task.after_backward(step)}
        if task.clip_groups:
            norms = [
                torch.nn.utils.clip_grad_norm_(g["params"], s.grad_clip, foreach=True)
                for g in optimizer.param_groups
            ]
            # All of them, unclipped (a group without gradients answers a CPU zero).
            grad_norm = sum(float(n) ** 2 for n in norms) ** 0.5
            metrics |= {
                f"grad_norm_{n}": float(v) for n, v in zip(task.clip_groups, norms, strict=True)
            }
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                list(params.values()), s.grad_clip, foreach=True
            )
        optimizer.step()
        if ema is not None:
            ema_update(ema.values(), [params[name] for name in ema], s.ema_decay, step)
        tokens_since += tokens * len(indices)
        state.step, state.epoch, state.batch = step + 1, position.epoch, position.batch
        window.append({"loss": float(loss.detach()), "grad_norm": float(grad_norm), **metrics})
        losses.append((step, float(loss.detach())))
        row = None
        if state.step % s.log_every == 0 or state.step == s.steps:
            elapsed = time.perf_counter() - tick
            # Each metric averaged over the steps that report it (DMD2's steps
            # alternate between two networks with their own losses).
            keys = dict.fromkeys(k for w in window for k in w)
            row = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window)
                   for k in keys}  # fmt: skip
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["tokens_per_s"] = tokens_since * rt.world_size / max(elapsed, 1e-9)
            log.add(state.step, row)
            window, tick, tokens_since = [], time.perf_counter(), 0
        if state.step % s.checkpoint_every == 0 or state.step == s.steps:
            state.wall_s += time.perf_counter() - started
            started = time.perf_counter()
            _save(cfg, stage, task, pipeline, optimizer, ema, state, rt, log)
        # Told after the step's checkpoint is written: a caller that stops the stage
        # here (a wall-clock deadline) finds this step saved, not the one before.
        if row is not None and progress is not None and rt.is_main:
            progress(stage, state.step, s.steps, row)
    summary = {}
    if task.finish is not None:
        summary = task.finish()
    final = _write_final(cfg, stage, task, pipeline, ema, state, rt, summary, log)
    return StageResult(stage, state.step, resume or "", final, summary, state.wall_s, losses)


def stage_task(cfg: TrainConfig, stage: str, pipeline: DuetPipeline, rt: Runtime) -> StageTask:
    if stage == "vae":
        return vae_task(cfg, pipeline, rt)
    if stage in ("pretrain", "sft"):
        return dit_task(cfg, stage, pipeline, rt)
    from pipelines.align.stages import align_task  # rlhf and distill

    return align_task(cfg, stage, pipeline, rt)


def _split_components(task: StageTask, full: dict[str, torch.Tensor]) -> dict[str, dict]:
    if len(task.components) == 1:
        return {task.components[0]: full}
    out: dict[str, dict] = {}
    for key, value in full.items():
        comp, rest = key.split(".", 1)
        out.setdefault(comp, {})[rest] = value
    return out


def _save(cfg, stage, task, pipeline, optimizer, ema, state, rt: Runtime, log) -> None:
    model_state, opt_tensors, groups, ema_state = ckpt.gather_training_state(
        task.module, optimizer, ema
    )
    state.param_groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in groups
    ]
    here = stage_uri(cfg, stage)
    target = None
    if rt.is_main:
        if rt.under_ray:
            target = tempfile.mkdtemp(prefix="duet-ckpt-")
        else:
            target = ckpt.checkpoint_dir(here, state.step)
        trained = _split_components(task, model_state)
        ckpt.write_checkpoint(target, pipeline, trained, opt_tensors, ema_state, state)
        log.flush()
    rt.publish({"step": state.step, "stage": stage, **log.last()}, target)
    if rt.is_main and not rt.under_ray:
        ckpt.prune_checkpoints(here, cfg.keep_checkpoints)
    rt.barrier()


def _vocabulary(task: StageTask, parent: str | None) -> list[str]:
    """The words of the captions this stage trained on, with its parent's."""
    inherited = (checkpoint_vocabulary(read_meta(parent)) or []) if parent else []
    return vocabulary_of((getattr(row, "text", "") for row in task.rows), inherited)


def _write_final(cfg, stage, task, pipeline, ema, state, rt: Runtime, summary, log) -> str:
    """The stage's output: the pipeline with EMA weights, and where it came from."""
    model_state = ckpt.full_model_state(task.module)
    if ema is not None:
        ema_full = {name: ckpt._full(t) for name, t in ema.items()}
        model_state = {k: ema_full.get(k, v) for k, v in model_state.items()}
    uri = final_uri(cfg, stage)
    if rt.is_main:
        extra = {
            "stage": stage,
            "steps": state.step,
            "parent": state.parent,
            "data_version": state.data_version,
            "train_config": state.config,
            "wall_s": round(state.wall_s, 1),
            "world_size": rt.world_size,
            "device": str(rt.device),
            "metrics": summary,
            # What prompts this checkpoint knows (duet generate warns outside it).
            VOCABULARY_KEY: _vocabulary(task, state.parent),
            **task.final_extra,
        }
        trained = _split_components(task, model_state)
        save_state(
            uri, ckpt.pipeline_tensors(pipeline, trained), ckpt.pipeline_meta(pipeline, extra)
        )
        log.write_report(summary)
    rt.barrier()
    return uri
