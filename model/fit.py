"""A small pure-PyTorch fitting loop: both VAEs, optionally the vocoder, then the DiT.

This is the single-process trainer used by the CPU overfit test and for quick
experiments; distributed training (Ray Train) wraps the same loss functions
elsewhere. Stages run in order because the DiT learns in the VAEs' latent space:

1. video VAE on random ``1 + 4j``-frame windows (a causal VAE encodes any window
   the way it encodes a clip start), audio VAE on whole clips;
2. latent calibration (per-channel mean/std), then encoding of every clip;
3. DiT with the rectified-flow loss, logit-normal shifted timesteps and text
   dropout (so classifier-free guidance has an unconditional model to contrast).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from model.dit import TextConditioning
from model.ema import ema_update
from model.flow_matching import (
    add_noise,
    flow_matching_loss,
    resolution_shift,
    sample_timesteps,
    velocity_target,
)
from model.pipeline import DuetPipeline
from model.references import ReferenceLatents, RefSlot
from model.video_vae import motion_map, pick_crop

if TYPE_CHECKING:
    from core.media import AVClip


@dataclass
class FitSettings:
    # Defaults: the recipe that meets the tiny overfit bar (bench/overfit.py, "current"),
    # less the crop, whose size depends on the frame size.
    video_vae_steps: int = 2000
    audio_vae_steps: int = 300
    vocoder_steps: int = 0
    dit_steps: int = 2000
    # The video VAE's per-position RMS norms diverge above ~1e-3; the audio VAE is happy higher.
    vae_lr: float = 5e-4
    audio_vae_lr: float = 2e-3
    dit_lr: float = 3e-3
    batch_size: int = 8  # both VAEs and the DiT
    video_window_frames: int = 9
    kl_weight: float = 1e-6
    motion_weight: float = 10.0
    # Train the (convolutional) video VAE on crops of this many pixels (0 = whole
    # frames), picked among a few candidates for the most motion: cheaper steps whose
    # pixels are mostly the moving objects a plain loss would neglect.
    video_crop_px: int = 0
    crop_candidates: int = 4
    grad_clip: float = 1.0
    # Exponential moving average of the DiT weights (0 = off), swapped in after training:
    # sampling from the average of the last few hundred steps smooths out the noise
    # that a high learning rate leaves in the final weights.
    dit_ema_decay: float = 0.998
    # Teach image-reference conditioning: the clip's own first frame (latent frame 0 is
    # the VAE's encoding of frame 0 alone, i.e. an image latent) as image slot 0, dropped
    # with probability flow.ref_dropout so the reference guidance scale has a contrast.
    first_frame_reference: bool = False
    seed: int = 0
    log_every: int = 100


@dataclass
class FitReport:
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def first_last(self, name: str) -> tuple[float, float]:
        values = self.losses[name]
        return values[0], values[-1]


def _cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(
    module: torch.nn.Module,
    params,
    steps: int,
    lr: float,
    loss_fn: Callable[[int], tuple[torch.Tensor, dict]],
    name: str,
    report: FitReport,
    settings: FitSettings,
    log: Callable[[str], None] | None,
    ema_decay: float = 0.0,
) -> None:
    if steps <= 0:
        return
    module.train()
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else None
    history = report.losses.setdefault(name, [])
    start = time.perf_counter()
    window: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        loss, _ = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        if ema is not None:
            ema_update(ema, params, ema_decay, step)
        window.append(float(loss.detach()))
        if (step + 1) % settings.log_every == 0 or step == 0 or step == steps - 1:
            history.append(sum(window) / len(window))
            window = []
            if log is not None:
                log(f"{name} step {step + 1}/{steps} loss {history[-1]:.4f}")
    if ema is not None:
        with torch.no_grad():
            for p, avg in zip(params, ema, strict=True):
                p.copy_(avg)
    module.eval()
    report.seconds[name] = time.perf_counter() - start


def fit_pipeline(
    pipeline: DuetPipeline,
    clips: list[AVClip],
    captions: list[str],
    settings: FitSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> FitReport:
    """Train every network of the pipeline on (clip, caption) pairs, in place."""
    settings = settings or FitSettings()
    if not clips or len(clips) != len(captions):
        raise ValueError(
            f"need one caption per clip, got {len(clips)} clips / {len(captions)} captions"
        )
    cfg = pipeline.config
    gen = torch.Generator().manual_seed(settings.seed)
    report = FitReport()
    device = pipeline.device

    pairs = [pipeline.clip_to_tensors(c) for c in clips]
    lengths = {v.shape[1] for v, _ in pairs}
    if len(lengths) != 1:
        raise ValueError(
            f"clips must have the same frame count after trimming, got {sorted(lengths)}"
        )
    videos = torch.stack([v for v, _ in pairs]).to(device)  # (N, 3, T, H, W)
    audios = torch.stack([a for _, a in pairs]).to(device)  # (N, 2, S)
    n, t_frames = videos.shape[0], videos.shape[2]
    b = settings.batch_size  # indices are drawn with replacement
    window = min(settings.video_window_frames, t_frames)
    tf = cfg.video_vae.temporal_factor
    window = 1 + tf * ((window - 1) // tf)

    # 1. VAEs -------------------------------------------------------------------
    sf = cfg.video_vae.spatial_factor
    crop = settings.video_crop_px
    if crop and (crop % sf or crop > min(videos.shape[3:])):
        raise ValueError(f"video_crop_px must be a multiple of {sf} within the frame, got {crop}")
    motion = motion_map(videos)  # (N, T, H, W)

    def pick_window(i: int) -> torch.Tensor:
        # Window starts on the clip's latent grid (frame 4j), so each latent sees the same
        # frame grouping in training as when the whole clip is encoded.
        start = tf * int(torch.randint(0, (t_frames - window) // tf + 1, (1,), generator=gen))
        clip = videos[i, :, start : start + window]
        if not crop:
            return clip
        y, x = pick_crop(motion[i, start : start + window], crop, sf, settings.crop_candidates, gen)
        return clip[:, :, y : y + crop, x : x + crop]

    def video_vae_loss(step: int):
        idx = torch.randint(0, n, (b,), generator=gen).tolist()
        batch = torch.stack([pick_window(i) for i in idx])
        return pipeline.video_vae.loss(batch, settings.kl_weight, gen, settings.motion_weight)

    def audio_vae_loss(step: int):
        idx = torch.randint(0, n, (b,), generator=gen)
        return pipeline.audio_vae.loss(audios[idx], settings.kl_weight, gen)

    def vocoder_loss(step: int):
        idx = torch.randint(0, n, (b,), generator=gen)
        ch = torch.randint(0, audios.shape[1], (b,), generator=gen)
        wav = audios[idx, ch]
        return pipeline.vocoder.loss(wav, pipeline.audio_vae.mel)

    _train(pipeline.video_vae, pipeline.video_vae.parameters(), settings.video_vae_steps,
           settings.vae_lr, video_vae_loss, "video_vae", report, settings, log)  # fmt: skip
    _train(pipeline.audio_vae, pipeline.audio_vae.parameters(), settings.audio_vae_steps,
           settings.audio_vae_lr, audio_vae_loss, "audio_vae", report, settings, log)  # fmt: skip
    if settings.vocoder_steps > 0:
        _train(pipeline.vocoder, pipeline.vocoder.parameters(), settings.vocoder_steps,
               settings.audio_vae_lr, vocoder_loss, "vocoder", report, settings, log)  # fmt: skip
        pipeline.use_neural_vocoder = True

    # 2. Calibrate and encode ------------------------------------------------------
    with torch.no_grad():
        pipeline.video_vae.calibrate([videos[i : i + 1] for i in range(n)])
        pipeline.audio_vae.calibrate([audios[i : i + 1] for i in range(n)])
        zv = torch.cat([pipeline.video_vae.encode(videos[i : i + 1]) for i in range(n)])
        za = torch.cat([pipeline.audio_vae.encode(audios[i : i + 1]) for i in range(n)])
    text = pipeline.encode_text(captions)

    # 3. DiT -----------------------------------------------------------------------
    dit = pipeline.dit
    patch = cfg.dit.video_patch
    num_tokens = zv.shape[2] * (zv.shape[3] // patch) * (zv.shape[4] // patch) + za.shape[2]
    shift = resolution_shift(num_tokens, cfg.flow)

    def dit_loss(step: int):
        idx = torch.randint(0, n, (b,), generator=gen)
        x0v, x0a = zv[idx], za[idx]
        nv = torch.randn(x0v.shape, generator=gen).to(device)
        na = torch.randn(x0a.shape, generator=gen).to(device)
        t = sample_timesteps(b, cfg.flow, shift, gen).to(device)
        drop = torch.rand(b, generator=gen) < cfg.flow.text_dropout
        cond = dit.drop_text(TextConditioning(text.tokens[idx], text.mask[idx]), drop)
        refs = None
        if settings.first_frame_reference:
            present = (torch.rand(b, generator=gen) >= cfg.flow.ref_dropout).to(device)
            refs = ReferenceLatents(images=[RefSlot(x0v[:, :, :1], present)])
        pred_v, pred_a = dit(add_noise(x0v, nv, t), add_noise(x0a, na, t), t, cond, refs)
        return flow_matching_loss(
            pred_v,
            pred_a,
            velocity_target(x0v, nv),
            velocity_target(x0a, na),
            cfg.flow.audio_loss_weight,
        )

    _train(
        dit,
        dit.parameters(),
        settings.dit_steps,
        settings.dit_lr,
        dit_loss,
        "dit",
        report,
        settings,
        log,
        ema_decay=settings.dit_ema_decay,
    )
    pipeline.eval()
    return report
