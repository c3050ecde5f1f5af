"""``generate(request) -> GeneratedClip``: the one generation API every caller uses.

A request is a prompt (or a multi-shot plan), optional references (up to 9 images,
3 video clips, 3 audio tracks), optional SDEdit source or one given branch
(:class:`GivenMedia`: video-to-audio, audio-to-video), and sampling settings.
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
from model.multishot import (
    ShotPlan,
    apply_transitions,
    generates_transitions,
    layout,
    shot_text,
)
from model.pipeline import DuetPipeline, _prepare_audio, clip_tensors
from model.reference_binding import encode_prompt
from model.references import ReferenceLatents, RefSlot, check_reference_counts
from model.samplers import Conditioning, Guidance, KeepLatents, sample

if TYPE_CHECKING:
    from core.media import AVClip

# Samplers a request may name ("renoise" is a Fast student's own, read from its checkpoint).
SAMPLERS = ("euler", "heun")
GIVEN_MODES = ("v2a", "a2v")
QUALITIES = ("full", "fast")
FULL_STEPS = 20


@dataclass
class ReferenceSet:
    """Reference media for one request (model sample rate for audio)."""

    images: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8 each
    videos: list[np.ndarray] = field(default_factory=list)  # (T, H, W, 3) uint8 each
    audios: list[np.ndarray] = field(default_factory=list)  # (C, N) float32 each
    # Image-to-video: the clip's first frame, in a slot of its own (the model's last
    # image slot, model.reference_binding), not one of ``images``.
    first_frame: np.ndarray | None = None  # (H, W, 3) uint8

    def __post_init__(self) -> None:
        check_reference_counts(
            len(self.images) + (self.first_frame is not None), len(self.videos), len(self.audios)
        )
        if self.first_frame is not None and (
            self.first_frame.ndim != 3 or self.first_frame.shape[-1] != 3
            or self.first_frame.dtype != np.uint8
        ):  # fmt: skip
            raise ValueError(
                f"first_frame must be (H, W, 3) uint8, got "
                f"{self.first_frame.shape} {self.first_frame.dtype}"
            )
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
        return not (self.images or self.videos or self.audios or self.first_frame is not None)


@dataclass
class EditSpec:
    source: AVClip
    strength: float = 0.6
    keep: str = "none"  # "none" | "audio" (regenerate video) | "video" (regenerate audio)


@dataclass
class GivenMedia:
    """One branch given, the other generated to match it: conditioning, not
    replacement. The given branch is encoded and held at its clean latents with flow
    time 0 through sampling (the DiT has a time per branch); the output carries the
    given media unchanged and lasts as long as it.

    ``v2a`` (video-to-audio): ``frames`` at ``fps`` are given, the sound is generated.
    ``a2v`` (audio-to-video): ``audio`` at ``sample_rate`` is given, the picture is
    generated.
    """

    mode: str
    frames: np.ndarray | None = None  # v2a: (T, H, W, 3) uint8
    fps: float = 0.0
    audio: np.ndarray | None = None  # a2v: (C, N) or (N,) float32
    sample_rate: int = 0

    def __post_init__(self) -> None:
        if self.mode not in GIVEN_MODES:
            raise ValueError(f"given mode must be one of {GIVEN_MODES}, got {self.mode!r}")
        if self.mode == "v2a":
            f = self.frames
            if f is None or f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8 or not len(f):
                shape = None if f is None else (f.shape, f.dtype)
                raise ValueError(f"v2a needs frames (T, H, W, 3) uint8, got {shape}")
            if not self.fps > 0:
                raise ValueError(f"v2a needs the video's fps > 0, got {self.fps}")
        else:
            a = self.audio
            if a is None or a.ndim not in (1, 2) or a.shape[-1] == 0:
                raise ValueError(
                    f"a2v needs an audio track (C, N) or (N,), got {None if a is None else a.shape}"
                )
            if not self.sample_rate > 0:
                raise ValueError(f"a2v needs the audio's sample rate > 0, got {self.sample_rate}")

    @property
    def keeps(self) -> str:
        """The branch the output keeps from the given media (``finish_edit``'s keep)."""
        return "video" if self.mode == "v2a" else "audio"

    def source_clip(self, fps: float, sample_rate: int) -> AVClip:
        """The given media as a clip; the other branch is a silent / one black frame
        placeholder that nothing reads."""
        from core.media import AVClip

        if self.mode == "v2a":
            silence = np.zeros((1, 1), dtype=np.float32)
            return AVClip(frames=self.frames, fps=self.fps, audio=silence, sample_rate=sample_rate)
        black = np.zeros((1, 1, 1, 3), dtype=np.uint8)
        audio = np.asarray(self.audio, dtype=np.float32)
        return AVClip(frames=black, fps=fps, audio=audio, sample_rate=self.sample_rate)


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
    given: GivenMedia | None = None  # v2a / a2v
    quality: str = "full"

    def validate(self) -> GenerationRequest:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be text, got {type(self.prompt).__name__}")
        # V2A / A2V may go without a prompt: the given branch is the condition.
        if self.shots is None and self.given is None and not self.prompt.strip():
            raise ValueError("a request needs a prompt (or a shot plan, or a given branch)")
        if self.shots is not None and self.edit is not None:
            raise ValueError("multi-shot generation and editing cannot be combined")
        if self.given is not None and (self.edit is not None or self.shots is not None):
            raise ValueError(
                f"{self.given.mode} (a given branch) cannot be combined with editing or "
                "multi-shot generation"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {self.quality!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        fixed_length = self.edit is not None or self.shots is not None or self.given is not None
        if not fixed_length and not self.duration_s > 0:
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


def student_shift(fast: dict, resolution: float) -> float:
    """The shift of a Fast student's step times: the one it was distilled at
    (``extra.fast.time_shift``), or the resolution shift where it records none (0)."""
    value = fast.get("time_shift")
    if not value:
        return resolution
    # Read from a checkpoint's config.json: a bad value is refused, not sampled with.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
        raise ValueError(f"the Fast student's time_shift must be in (0, 100], got {value!r}")
    return float(value)


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


def _reference_counts(refs: ReferenceSet | None) -> dict[str, int]:
    if refs is None:
        return {}
    return {"image": len(refs.images), "video": len(refs.videos), "audio": len(refs.audios)}


def _reference_latents(
    pipeline: DuetPipeline, refs: ReferenceSet | None
) -> ReferenceLatents | None:
    if refs is None or refs.is_empty():
        return None
    images: list[RefSlot | None] = [RefSlot(pipeline.encode_image(img)) for img in refs.images]
    if refs.first_frame is not None:  # the I2V slot: the model's last image slot
        slots = pipeline.config.dit.max_image_refs
        if len(images) >= slots:
            raise ValueError(f"a first frame leaves {slots - 1} image reference slots")
        images += [None] * (slots - 1 - len(images)) + [
            RefSlot(pipeline.encode_image(refs.first_frame))
        ]
    return ReferenceLatents(
        images=images,
        videos=[RefSlot(pipeline.encode_video_frames(vid)) for vid in refs.videos],
        audios=[RefSlot(pipeline.encode_audio_track(aud)) for aud in refs.audios],
    )


def prepare_given(
    pipeline: DuetPipeline, given: GivenMedia, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, KeepLatents, int]:
    """Initial latents (the given branch clean, the other noise), the given branch to
    hold, and the clip's frame count (the given media's length, as 1 + 4k frames)."""
    cfg = pipeline.config
    device = pipeline.device
    source = given.source_clip(cfg.fps, cfg.sample_rate)
    m = cfg.audio_latents_per_video_latent
    if given.mode == "v2a":
        # Retimed and resized as training clips are (clip_tensors), then encoded.
        frames, _ = clip_tensors(source, cfg)  # (3, 1+4k, H, W)
        num_frames = frames.shape[1]
        video = pipeline.video_vae.encode(frames[None].to(device))
        n_lat = video.shape[2]
        a_shape = (1, cfg.audio_vae.latent_channels, n_lat * m)
        audio = torch.randn(a_shape, generator=generator).to(device)
        return video, audio, KeepLatents(video=video), num_frames
    from core.media import resample_audio

    wav = resample_audio(source.audio, source.sample_rate, cfg.sample_rate)
    num_frames = cfg.frames_for_duration(wav.shape[-1] / cfg.sample_rate)
    # Front-padded and cut to the latent grid exactly as a training clip's audio.
    audio = pipeline.audio_vae.encode(_prepare_audio(wav, cfg, num_frames)[None].to(device))
    n_lat = cfg.num_latent_frames(num_frames)
    sf = cfg.video_vae.spatial_factor
    v_shape = (1, cfg.video_vae.latent_channels, n_lat, cfg.height // sf, cfg.width // sf)
    video = torch.randn(v_shape, generator=generator).to(device)
    return video, audio, KeepLatents(audio=audio), num_frames


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
        text = shot_text(pipe.text_encoder, request.shots, cfg)
        text.tokens, text.mask, text.shot_ids = (
            text.tokens.to(device),
            text.mask.to(device),
            text.shot_ids.to(device),
        )
    else:
        num_frames = cfg.frames_for_duration(request.duration_s)
        if request.prompt.strip():
            # @-bindings (``@image1 subject``) are encoded as training joins them.
            text = encode_prompt(pipe, request.prompt, _reference_counts(request.references))
        else:  # a given branch without a prompt: the unconditional text
            text = pipe.dit.null_text_conditioning(1, device)
    refs = _reference_latents(pipe, request.references)

    keep = None
    if request.edit is not None:
        edit_state = prepare_edit(
            pipe, request.edit.source, request.edit.strength, request.edit.keep, generator
        )
        num_frames = edit_state.num_frames
        video, audio = edit_state.init_video, edit_state.init_audio
        t_start, keep = edit_state.t_start, edit_state.keep
    elif request.given is not None:
        video, audio, keep, num_frames = prepare_given(pipe, request.given, generator)
        t_start = 1.0
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
        shift = student_shift(fast, shift)
        # Text guidance is distilled into the student; references, if any, condition
        # it directly (their guidance scale is not distilled).
        guidance = Guidance(1.0, 1.0)
    else:
        steps = int(request.steps)
        sampler = request.sampler
        guidance = Guidance(request.text_scale, request.ref_scale)
    times = schedule(steps, shift, t_start)
    cond = Conditioning(text=text, references=refs, shots=shots)
    counter = EvalCounter(pipe.dit, video.shape[0])
    try:
        video, audio = sample(
            pipe.dit, video, audio, cond, times, sampler, guidance, keep, generator
        )
    finally:
        counter.close()

    clip = pipe.decode_latents(video, audio, num_frames, seed=int(request.seed))
    transitions = None
    if request.shots is not None:
        # Checkpoints trained on continuous multi-shot footage draw the plan's cuts
        # and fades themselves; older ones get the fades drawn on the decoded clip.
        transitions = "generated" if generates_transitions(cfg) else "applied"
        if transitions == "applied":
            clip = apply_transitions(clip, request.shots)
    if request.edit is not None:
        clip = finish_edit(clip, request.edit.source, request.edit.keep)
    if request.given is not None:
        given = request.given
        clip = finish_edit(clip, given.source_clip(cfg.fps, cfg.sample_rate), given.keeps)

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
        "transitions": transitions,
        "edit": (
            {"strength": float(request.edit.strength), "keep": request.edit.keep}
            if request.edit is not None
            else None
        ),
        "given": request.given.mode if request.given is not None else None,
        "vocoder": "neural" if pipe.use_neural_vocoder else "griffin_lim",
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    return GeneratedClip(clip=clip, metadata=metadata, latents=(video, audio))
