"""``generate(request) -> GeneratedClip``: the one generation API every caller uses.

A request is a prompt (or a multi-shot plan), optional references (up to 9 images,
3 video clips, 3 audio tracks), optional SDEdit source, and sampling settings.
Generation is deterministic for a given seed: the initial noise comes from a
``torch.Generator`` seeded with it, and so does the vocoder's phase.

``quality="full"`` samples the model with Heun and classifier-free guidance (20 steps
by default); ``quality="fast"`` needs a Fast student (the ``distill`` stage's final
checkpoint, see :mod:`pipelines.align.distill`), which samples with Euler in 4 steps
by default (or 8) with the guidance distilled in: one network evaluation per step.
Every result reports ``network_evals``: DiT forward rows per generated clip,
guidance passes included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.editing import check_edit, finish_edit, prepare_edit
from model.flow_matching import resolution_shift, schedule
from model.multishot import ShotPlan, apply_transitions, layout, shot_text
from model.pipeline import DuetPipeline
from model.references import ReferenceLatents, RefSlot, check_reference_counts
from model.samplers import Conditioning, Guidance, sample

if TYPE_CHECKING:
    from core.media import AVClip

SAMPLERS = ("euler", "heun")
QUALITIES = ("full", "fast")
FULL_STEPS = 20


@dataclass
class ReferenceSet:
    """Reference media for one request (model sample rate for audio)."""

    images: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8 each
    videos: list[np.ndarray] = field(default_factory=list)  # (T, H, W, 3) uint8 each
    audios: list[np.ndarray] = field(default_factory=list)  # (C, N) float32 each

    def __post_init__(self) -> None:
        check_reference_counts(len(self.images), len(self.videos), len(self.audios))
        for i, img in enumerate(self.images):
            if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
                raise ValueError(
                    f"image reference {i} must be (H, W, 3) uint8, got {img.shape} {img.dtype}"
                )
        for i, vid in enumerate(self.videos):
            if vid.ndim != 4 or vid.shape[-1] != 3 or vid.dtype != np.uint8:
                raise ValueError(
                    f"video reference {i} must be (T, H, W, 3) uint8, got {vid.shape} {vid.dtype}"
                )
        for i, aud in enumerate(self.audios):
            if aud.ndim not in (1, 2) or aud.size == 0:
                raise ValueError(f"audio reference {i} must be (C, N) or (N,), got {aud.shape}")

    def is_empty(self) -> bool:
        return not (self.images or self.videos or self.audios)


@dataclass
class EditSpec:
    source: AVClip
    strength: float = 0.6
    keep: str = "none"  # "none" | "audio" (regenerate video) | "video" (regenerate audio)


@dataclass
class GenerationRequest:
    prompt: str = ""
    duration_s: float = 2.0
    seed: int = 0
    # "fast": steps above the student's largest trained count (8) mean its default (4).
    steps: int = FULL_STEPS
    sampler: str = "heun"
    text_scale: float = 4.0
    ref_scale: float = 1.5
    references: ReferenceSet | None = None
    shots: ShotPlan | None = None
    edit: EditSpec | None = None
    quality: str = "full"

    def validate(self) -> GenerationRequest:
        if self.shots is None and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            raise ValueError("a request needs a prompt (or a shot plan)")
        if self.shots is not None and self.edit is not None:
            raise ValueError("multi-shot generation and editing cannot be combined")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {self.quality!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.edit is None and self.shots is None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.edit is not None:
            check_edit(self.edit.strength, self.edit.keep)
        return self


@dataclass
class GeneratedClip:
    clip: AVClip
    metadata: dict
    # The sampled latents (video (1, Cv, T, h, w), audio (1, Ca, Na)), e.g. for a reward model.
    latents: tuple[torch.Tensor, torch.Tensor] | None = None


def fast_settings(pipeline: DuetPipeline) -> dict:
    """The Fast student's settings; a clear error for a checkpoint that is not one."""
    fast = getattr(pipeline, "fast", None)
    if not fast:
        raise ValueError(
            "quality='fast' needs a Fast student checkpoint (the final checkpoint of "
            "`duet train distill`); this pipeline is a full model"
        )
    return fast


class EvalCounter:
    """Counts DiT forward rows per generated sample (guidance passes are rows too)."""

    def __init__(self, module: torch.nn.Module, batch: int):
        self.rows = 0
        self.batch = batch
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.rows += int(args[0].shape[0])

    @property
    def per_sample(self) -> float:
        return self.rows / self.batch

    def close(self) -> None:
        self._handle.remove()


def _reference_latents(
    pipeline: DuetPipeline, refs: ReferenceSet | None
) -> ReferenceLatents | None:
    if refs is None or refs.is_empty():
        return None
    return ReferenceLatents(
        images=[RefSlot(pipeline.encode_image(img)) for img in refs.images],
        videos=[RefSlot(pipeline.encode_video_frames(vid)) for vid in refs.videos],
        audios=[RefSlot(pipeline.encode_audio_track(aud)) for aud in refs.audios],
    )


def resolve_pipeline(
    pipeline: DuetPipeline | None, checkpoint: str | None, preset: str
) -> DuetPipeline:
    if pipeline is not None:
        return pipeline
    if checkpoint:
        return DuetPipeline.from_checkpoint(checkpoint)
    return DuetPipeline.from_preset(preset).eval()


@torch.no_grad()
def generate(
    request: GenerationRequest,
    pipeline: DuetPipeline | None = None,
    checkpoint: str | None = None,
    preset: str = "tiny",
    quality: str | None = None,
) -> GeneratedClip:
    """Generate one clip (frames + stereo audio) and its metadata.

    ``quality`` ("full" | "fast") overrides ``request.quality`` when given."""
    if quality is not None:
        request = replace(request, quality=quality)
    request.validate()
    started = time.perf_counter()
    pipe = resolve_pipeline(pipeline, checkpoint, preset)
    pipe.eval()
    cfg = pipe.config
    device = pipe.device
    generator = torch.Generator().manual_seed(int(request.seed))

    shots = None
    if request.shots is not None:
        num_frames, shots = layout(request.shots, cfg)
        text = shot_text(pipe.text_encoder, request.shots)
        text.tokens, text.mask, text.shot_ids = (
            text.tokens.to(device),
            text.mask.to(device),
            text.shot_ids.to(device),
        )
    else:
        num_frames = cfg.frames_for_duration(request.duration_s)
        text = pipe.encode_text([request.prompt])
    refs = _reference_latents(pipe, request.references)

    edit_state = None
    if request.edit is not None:
        edit_state = prepare_edit(
            pipe, request.edit.source, request.edit.strength, request.edit.keep, generator
        )
        num_frames = edit_state.num_frames
        video, audio = edit_state.init_video, edit_state.init_audio
        t_start = edit_state.t_start
    else:
        n_lat = cfg.num_latent_frames(num_frames)
        sf = cfg.video_vae.spatial_factor
        v_shape = (1, cfg.video_vae.latent_channels, n_lat, cfg.height // sf, cfg.width // sf)
        a_shape = (1, cfg.audio_vae.latent_channels, n_lat * cfg.audio_latents_per_video_latent)
        video = torch.randn(v_shape, generator=generator).to(device)
        audio = torch.randn(a_shape, generator=generator).to(device)
        t_start = 1.0

    patch = cfg.dit.video_patch
    num_tokens = (
        video.shape[2] * (video.shape[3] // patch) * (video.shape[4] // patch) + audio.shape[2]
    )
    shift = resolution_shift(num_tokens, cfg.flow)
    if request.quality == "fast":
        fast = fast_settings(pipe)
        trained = max(int(n) for n in fast["steps"])
        steps = int(request.steps) if request.steps <= trained else int(fast["default_steps"])
        sampler = fast.get("sampler", "euler")
        # Text guidance is distilled into the student; references, if any, condition
        # it directly (their guidance scale is not distilled).
        guidance = Guidance(1.0, 1.0)
    else:
        steps = int(request.steps)
        sampler = request.sampler
        guidance = Guidance(request.text_scale, request.ref_scale)
    times = schedule(steps, shift, t_start)
    cond = Conditioning(text=text, references=refs, shots=shots)
    keep = edit_state.keep if edit_state is not None else None
    counter = EvalCounter(pipe.dit, video.shape[0])
    try:
        video, audio = sample(pipe.dit, video, audio, cond, times, sampler, guidance, keep)
    finally:
        counter.close()

    clip = pipe.decode_latents(video, audio, num_frames, seed=int(request.seed))
    if request.shots is not None:
        clip = apply_transitions(clip, request.shots)
    if request.edit is not None:
        clip = finish_edit(clip, request.edit.source, request.edit.keep)

    metadata = {
        "prompt": request.prompt,
        "preset": cfg.name,
        "seed": int(request.seed),
        "quality": request.quality,
        "steps": steps,
        "sampler": sampler,
        "text_scale": float(guidance.text_scale),
        "ref_scale": float(guidance.ref_scale),
        "network_evals": counter.per_sample,
        "shift": shift,
        "num_frames": int(clip.num_frames),
        "fps": float(clip.fps),
        "sample_rate": int(clip.sample_rate),
        "duration_s": clip.duration_s,
        "references": {
            "images": len(request.references.images) if request.references else 0,
            "videos": len(request.references.videos) if request.references else 0,
            "audios": len(request.references.audios) if request.references else 0,
        },
        "shots": request.shots.to_dict() if request.shots is not None else None,
        "edit": (
            {"strength": float(request.edit.strength), "keep": request.edit.keep}
            if request.edit is not None
            else None
        ),
        "vocoder": "neural" if pipe.use_neural_vocoder else "griffin_lim",
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    return GeneratedClip(clip=clip, metadata=metadata, latents=(video, audio))
