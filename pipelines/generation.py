"""Generation for serving and bulk jobs: many requests at once, with progress and cancel.

``generate_many`` runs a list of :class:`model.generate.GenerationRequest` on one
pipeline. Requests that can share a denoising batch (plain text-to-audio-video with
the same length, steps, sampler and guidance scales) are sampled as one batch, with
each request's initial noise drawn from its own seeded generator exactly as
``model.generate.generate`` draws it, so a clip does not depend on what it was batched
with. Everything else (references, editing, V2A / A2V, multi-shot) runs through
``model.generate.generate`` one request at a time.

A negative prompt replaces the null text of classifier-free guidance for its row
(``v = v(negative) + s * (v(prompt) - v(negative))``). That is done by wrapping the
DiT so that its ``null_text_conditioning`` returns the negative prompts' encodings:
the samplers in ``model/`` are used unchanged. The same wrapper counts network
evaluations, which is the progress a caller sees, and is where a cancel lands.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from model.dit import TextConditioning
from model.flow_matching import resolution_shift, schedule
from model.generate import GeneratedClip, GenerationRequest, generate, student_shift
from model.pipeline import DuetPipeline
from model.samplers import Conditioning, Guidance, _concat_text, sample

ProgressFn = Callable[[int, float], None]  # (request index, fraction done)


class GenerationCancelled(Exception):
    """Raised from a progress callback to stop sampling (a cancelled job)."""


def model_supports_quality() -> bool:
    """True once ``model.generate.generate`` accepts ``quality=`` (the distilled Fast path)."""
    return "quality" in inspect.signature(generate).parameters


def is_fast_student(pipeline: DuetPipeline) -> bool:
    """A distilled Fast checkpoint (``duet train distill``), sampled by ``generate(quality="fast")``."""
    return bool(getattr(pipeline, "fast", None)) and model_supports_quality()


def student_request(pipeline: DuetPipeline, request: GenerationRequest) -> GenerationRequest:
    """A request as a distilled Fast student samples it (``generate(quality="fast")``):
    its trained step count, its sampler, guidance distilled in (scales 1: one network
    evaluation per step, so a negative prompt has no effect)."""
    fast = pipeline.fast
    trained = max(int(n) for n in fast["steps"])
    steps = int(request.steps) if request.steps <= trained else int(fast["default_steps"])
    return replace(
        request, steps=steps, sampler=fast.get("sampler", "euler"), text_scale=1.0, ref_scale=1.0
    )


def evaluations_per_request(steps: int, sampler: str) -> int:
    """Network evaluations ``model.samplers.sample`` makes (Heun skips t = 0)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def batch_key(request: GenerationRequest, negative_prompt: str = "") -> tuple | None:
    """Requests with equal keys can share one denoising batch; None: run alone."""
    if request.references is not None and not request.references.is_empty():
        return None
    if request.shots is not None or request.edit is not None or request.given is not None:
        return None
    return (
        round(float(request.duration_s), 6),
        int(request.steps),
        request.sampler,
        float(request.text_scale),
        float(request.ref_scale),
    )


class _GuidedDiT(nn.Module):
    """The DiT with per-row negative prompts as the unconditional text, counting calls."""

    def __init__(self, dit: nn.Module, negatives: TextConditioning | None, on_call: Callable):
        super().__init__()
        self.dit = dit
        self.negatives = negatives
        self.on_call = on_call

    def null_text_conditioning(self, batch: int, device=None) -> TextConditioning:
        if self.negatives is None:
            return self.dit.null_text_conditioning(batch, device)
        if batch != self.negatives.tokens.shape[0]:
            raise ValueError(f"negative prompts for {self.negatives.tokens.shape[0]}, not {batch}")
        return self.negatives

    def forward(self, *args, **kwargs):
        out = self.dit(*args, **kwargs)
        self.on_call()
        return out


def _negative_conditioning(
    pipeline: DuetPipeline, negatives: list[str], device
) -> TextConditioning | None:
    """Per row: the negative prompt's encoding, or the model's null token when empty."""
    if not any(n.strip() for n in negatives):
        return None
    rows = []
    for text in negatives:
        if text.strip():
            rows.append(pipeline.encode_text([text]))
        else:
            rows.append(pipeline.dit.null_text_conditioning(1, device))
    return _concat_text(rows)


@torch.no_grad()
def _generate_batch(
    pipeline: DuetPipeline,
    requests: list[GenerationRequest],
    negatives: list[str],
    progress: Callable[[float], None],
    fast: dict | None = None,
) -> list[GeneratedClip]:
    """One denoising batch for requests sharing a :func:`batch_key`; ``fast``: a Fast
    student's settings (its requests already made by :func:`student_request`)."""
    started = time.perf_counter()
    cfg = pipeline.config
    device = pipeline.device
    first = requests[0]
    num_frames = cfg.frames_for_duration(first.duration_s)
    n_lat = cfg.num_latent_frames(num_frames)
    sf = cfg.video_vae.spatial_factor
    v_shape = (1, cfg.video_vae.latent_channels, n_lat, cfg.height // sf, cfg.width // sf)
    a_shape = (1, cfg.audio_vae.latent_channels, n_lat * cfg.audio_latents_per_video_latent)
    videos, audios, generators = [], [], []
    for req in requests:
        # Same draws, in the same order, as model.generate.generate (a renoise
        # student's fresh noise too: each row from its own request's generator).
        generator = torch.Generator().manual_seed(int(req.seed))
        videos.append(torch.randn(v_shape, generator=generator))
        audios.append(torch.randn(a_shape, generator=generator))
        generators.append(generator)
    video = torch.cat(videos).to(device)
    audio = torch.cat(audios).to(device)
    text = pipeline.encode_text([r.prompt for r in requests])
    patch = cfg.dit.video_patch
    num_tokens = video.shape[2] * (video.shape[3] // patch) * (video.shape[4] // patch)
    shift = resolution_shift(num_tokens + audio.shape[2], cfg.flow)
    if fast is not None:
        shift = student_shift(fast, shift)
    times = schedule(first.steps, shift, 1.0)
    total = evaluations_per_request(first.steps, first.sampler)
    calls = [0]

    def on_call() -> None:
        calls[0] += 1
        progress(min(1.0, calls[0] / total))

    model = _GuidedDiT(pipeline.dit, _negative_conditioning(pipeline, negatives, device), on_call)
    guidance = Guidance(first.text_scale, first.ref_scale)
    cond = Conditioning(text=text)
    video, audio = sample(
        model, video, audio, cond, times, first.sampler, guidance, generator=generators
    )
    elapsed = time.perf_counter() - started
    results = []
    for i, req in enumerate(requests):
        clip = pipeline.decode_latents(
            video[i : i + 1], audio[i : i + 1], num_frames, int(req.seed)
        )
        results.append(
            GeneratedClip(
                clip=clip,
                metadata=_metadata(
                    pipeline, req, clip, shift, elapsed, len(requests), negatives[i]
                ),
                latents=(video[i : i + 1], audio[i : i + 1]),
            )
        )
    return results


def _metadata(pipeline, req, clip, shift, elapsed, batch_size, negative) -> dict:
    return {
        "prompt": req.prompt,
        "negative_prompt": negative,
        "preset": pipeline.config.name,
        "seed": int(req.seed),
        "steps": int(req.steps),
        "sampler": req.sampler,
        "text_scale": float(req.text_scale),
        "ref_scale": float(req.ref_scale),
        "shift": shift,
        "num_frames": int(clip.num_frames),
        "fps": float(clip.fps),
        "sample_rate": int(clip.sample_rate),
        "duration_s": clip.duration_s,
        "references": {"images": 0, "videos": 0, "audios": 0},
        "shots": None,
        "edit": None,
        "given": None,
        "vocoder": "neural" if pipeline.use_neural_vocoder else "griffin_lim",
        "elapsed_s": round(elapsed, 3),
        "batch_size": batch_size,
    }


def _generate_one(
    pipeline: DuetPipeline,
    request: GenerationRequest,
    negative: str,
    progress: Callable[[float], None],
    quality: str | None,
) -> GeneratedClip:
    """A request that cannot be batched: ``model.generate.generate`` with progress."""
    total = evaluations_per_request(request.steps, request.sampler)
    if request.edit is not None:
        total = max(1, int(round(total * request.edit.strength)))
    calls = [0]

    def on_call() -> None:
        calls[0] += 1
        progress(min(1.0, calls[0] / total))

    device = pipeline.device
    wrapped = _GuidedDiT(
        pipeline.dit, _negative_conditioning(pipeline, [negative], device), on_call
    )
    original = pipeline.dit
    # generate() reaches the DiT as pipeline.dit; swap the wrapper in for this call.
    pipeline.dit = wrapped
    try:
        kwargs = {"quality": "fast"} if quality == "fast" and is_fast_student(pipeline) else {}
        result = generate(request, pipeline=pipeline, **kwargs)
    finally:
        pipeline.dit = original
    result.metadata["negative_prompt"] = negative
    result.metadata["batch_size"] = 1
    return result


def generate_many(
    pipeline: DuetPipeline,
    requests: list[GenerationRequest],
    negative_prompts: list[str] | None = None,
    progress: ProgressFn | None = None,
    quality: str | None = None,
    max_batch: int = 8,
) -> list[GeneratedClip | Exception]:
    """Generate every request; compatible ones share batches of up to ``max_batch``.

    Returns one entry per request, in order: its clip, or the exception that stopped
    it (a bad request fails alone; :class:`GenerationCancelled` from ``progress``
    stops the batch it was raised in and is returned for each of its requests).
    With ``quality="fast"`` and a distilled Fast student as ``pipeline``, requests are
    sampled the student's way (:func:`student_request`; batched when compatible, else
    through ``generate(..., quality="fast")``); with a full model, ``fast`` is the
    requests' own (few) steps.
    """
    negatives = list(negative_prompts or [""] * len(requests))
    if len(negatives) != len(requests):
        raise ValueError(f"{len(negatives)} negative prompts for {len(requests)} requests")
    report = progress or (lambda index, fraction: None)
    results: list[GeneratedClip | Exception | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    alone: list[int] = []
    student = quality == "fast" and is_fast_student(pipeline)
    batched_requests = list(requests)
    for i, req in enumerate(requests):
        try:
            req.validate()
        except ValueError as err:
            results[i] = err
            continue
        key = batch_key(req, negatives[i])
        if student and key is not None:
            # The student's own sampling, as generate(quality="fast") does it, so its
            # plain requests can share a batch too.
            batched_requests[i] = student_request(pipeline, req)
            key = ("fast", *batch_key(batched_requests[i]))
        if key is None:
            alone.append(i)
        else:
            groups.setdefault(key, []).append(i)
    pipeline.eval()
    for indices in groups.values():
        for start in range(0, len(indices), max(1, max_batch)):
            chunk = indices[start : start + max(1, max_batch)]

            stopped: set[int] = set()

            def batch_progress(fraction: float, chunk=chunk, stopped=stopped) -> None:
                # A cancelled request leaves the batch's results; the batch itself
                # stops only once every request in it is cancelled.
                for i in chunk:
                    if i not in stopped:
                        try:
                            report(i, fraction)
                        except GenerationCancelled:
                            stopped.add(i)
                if len(stopped) == len(chunk):
                    raise GenerationCancelled(f"all {len(chunk)} requests of the batch")

            try:
                clips = _generate_batch(
                    pipeline, [batched_requests[i] for i in chunk],
                    [negatives[i] for i in chunk], batch_progress,
                    pipeline.fast if student else None,
                )  # fmt: skip
                for i, clip in zip(chunk, clips, strict=True):
                    if student:
                        clip.metadata.update(
                            quality="fast", network_evals=float(batched_requests[i].steps)
                        )
                    results[i] = GenerationCancelled(str(i)) if i in stopped else clip
            except Exception as err:  # one batch's failure is reported for its requests
                for i in chunk:
                    results[i] = err
    for i in alone:
        try:
            results[i] = _generate_one(
                pipeline, requests[i], negatives[i], lambda f, i=i: report(i, f), quality
            )
        except Exception as err:
            results[i] = err
    return results  # type: ignore[return-value]


ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:5", "4:3", "3:4")


def aspect_size(width: int, height: int, aspect: str) -> tuple[int, int]:
    """The largest even ``(w, h)`` of ratio ``aspect`` inside ``width x height``."""
    try:
        aw, ah = (int(x) for x in aspect.split(":"))
        if aw <= 0 or ah <= 0:
            raise ValueError
    except ValueError as err:
        raise ValueError(f"aspect ratio must look like 16:9, got {aspect!r}") from err
    scale = min(width / aw, height / ah)
    w = max(2, int(aw * scale) // 2 * 2)
    h = max(2, int(ah * scale) // 2 * 2)
    return w, h


def center_crop(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """(T, H, W, 3) -> (T, height, width, 3), centred; the model renders one size,
    other aspect ratios are cut from its frame."""
    _, h, w, _ = frames.shape
    if width > w or height > h:
        raise ValueError(f"cannot crop {width}x{height} from {w}x{h}")
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])
