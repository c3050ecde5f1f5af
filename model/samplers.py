"""Samplers for the rectified flow: Euler, Heun and renoise, with two-scale guidance.

``renoise`` is the multi-step sampling of consistency models and DMD2's few-step
students: each step predicts the clean latents ``x0 = x - t v`` and noises them
afresh to the next time, ``(1 - t') x0 + t' e`` with new Gaussian noise ``e`` (from
the request's generator), where Euler would carry the step's own implied noise
forward. A student distilled with it (``distill.dmd.sampler``) is sampled with it.

Classifier-free guidance has separate text and reference scales (as in
InstructPix2Pix): with references present three predictions are combined,

    v = v(null, no refs) + s_ref * (v(null, refs) - v(null, no refs))
                         + s_text * (v(text, refs) - v(null, refs)),

and without references the usual two. All passes run as one batched forward.

A branch can be given instead of generated (:class:`KeepLatents`: video-to-audio,
audio-to-video, "keep audio / keep video" edits): it is conditioning, not
replacement. The model has a flow time per branch, so the given branch is held at
its clean latents with time 0 at every step while the other is integrated; the
given branch is returned exactly as it came in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.dit import DualBranchDiT, ShotLayout, TextConditioning
from model.references import ReferenceLatents, RefSlot

METHODS = ("euler", "heun", "renoise")


@dataclass
class Guidance:
    text_scale: float = 4.0
    ref_scale: float = 1.5


@dataclass
class Conditioning:
    text: TextConditioning
    references: ReferenceLatents | None = None
    shots: ShotLayout | None = None


@dataclass
class KeepLatents:
    """Clean latents of a given branch, held fixed at flow time 0 during sampling."""

    video: torch.Tensor | None = None  # (B, Cv, T, h, w)
    audio: torch.Tensor | None = None  # (B, Ca, Na)

    def __post_init__(self) -> None:
        if self.video is not None and self.audio is not None:
            raise ValueError("at most one branch can be given: nothing would be generated")

    def times(self, t: float) -> tuple[float, float]:
        """(video, audio) flow times at sampler time t: 0 for the given branch."""
        return (0.0 if self.video is not None else t, 0.0 if self.audio is not None else t)

    def hold(self, video: torch.Tensor, audio: torch.Tensor):
        """The latents with the given branch put back (exactly)."""
        return (
            video if self.video is None else self.video.to(video.dtype),
            audio if self.audio is None else self.audio.to(audio.dtype),
        )


def _repeat_refs(refs: ReferenceLatents, times: int) -> ReferenceLatents:
    def rep(slot: RefSlot | None) -> RefSlot | None:
        if slot is None:
            return None
        present = None if slot.present is None else slot.present.repeat(times)
        return RefSlot(slot.latent.repeat(times, *([1] * (slot.latent.dim() - 1))), present)

    return ReferenceLatents(
        [rep(s) for s in refs.images], [rep(s) for s in refs.videos], [rep(s) for s in refs.audios]
    )


def _absent_refs_like(refs: ReferenceLatents, batch: int) -> ReferenceLatents:
    """Same slots as refs but present in no sample (for the unconditional rows)."""

    def off(slot: RefSlot | None) -> RefSlot | None:
        if slot is None:
            return None
        return RefSlot(slot.latent, torch.zeros(batch, dtype=torch.bool, device=slot.latent.device))

    return ReferenceLatents(
        [off(s) for s in refs.images], [off(s) for s in refs.videos], [off(s) for s in refs.audios]
    )


def _concat_refs(parts: list[ReferenceLatents]) -> ReferenceLatents:
    def cat(slots: list[RefSlot | None]) -> RefSlot | None:
        if all(s is None for s in slots):
            return None
        batch = [s for s in slots if s is not None][0]
        lat = torch.cat([(s or batch).latent for s in slots], dim=0)
        pres = []
        for s in slots:
            b = (s or batch).latent.shape[0]
            if s is None:
                pres.append(torch.zeros(b, dtype=torch.bool, device=lat.device))
            elif s.present is None:
                pres.append(torch.ones(b, dtype=torch.bool, device=lat.device))
            else:
                pres.append(s.present)
        return RefSlot(lat, torch.cat(pres))

    def kind(name: str) -> list[RefSlot | None]:
        lists = [getattr(p, name) for p in parts]
        n = max(len(x) for x in lists)
        return [cat([x[i] if i < len(x) else None for x in lists]) for i in range(n)]

    return ReferenceLatents(kind("images"), kind("videos"), kind("audios"))


def _concat_text(parts: list[TextConditioning]) -> TextConditioning:
    length = max(p.tokens.shape[1] for p in parts)
    tokens, masks, ids = [], [], []
    use_ids = any(p.shot_ids is not None for p in parts)
    for p in parts:
        pad = length - p.tokens.shape[1]
        tokens.append(torch.nn.functional.pad(p.tokens, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(p.mask, (0, pad), value=False))
        if use_ids:
            sid = (
                p.shot_ids
                if p.shot_ids is not None
                else torch.full_like(p.mask, -1, dtype=torch.long)
            )
            ids.append(torch.nn.functional.pad(sid, (0, pad), value=-1))
    return TextConditioning(
        torch.cat(tokens), torch.cat(masks), torch.cat(ids) if use_ids else None
    )


def guided_velocity(
    model: DualBranchDiT,
    video: torch.Tensor,
    audio: torch.Tensor,
    t: float | tuple[float, float],  # one time, or (video, audio) times
    cond: Conditioning,
    guidance: Guidance,
) -> tuple[torch.Tensor, torch.Tensor]:
    b = video.shape[0]
    t_v, t_a = (t, t) if isinstance(t, (int, float)) else t
    # One (B,) tensor when the branches share the time (what callers that wrap the
    # model expect), a (video, audio) pair when one branch is given.
    tt = torch.full((b,), float(t_v), device=video.device)
    if t_a != t_v:
        tt = (tt, torch.full((b,), float(t_a), device=video.device))
    has_refs = cond.references is not None and not cond.references.is_empty()
    use_text_cfg = guidance.text_scale != 1.0
    use_ref_cfg = has_refs and guidance.ref_scale != 1.0
    if not use_text_cfg and not use_ref_cfg:
        return model(video, audio, tt, cond.text, cond.references, cond.shots)

    null = model.null_text_conditioning(b, video.device)
    texts = [cond.text, null]
    refs = None
    if has_refs:
        no_refs = _absent_refs_like(cond.references, b)
        texts.append(null)
        refs = _concat_refs([cond.references, cond.references, no_refs])
    n = len(texts)
    v_all, a_all = model(
        video.repeat(n, 1, 1, 1, 1),
        audio.repeat(n, 1, 1),
        tt.repeat(n) if isinstance(tt, torch.Tensor) else (tt[0].repeat(n), tt[1].repeat(n)),
        _concat_text(texts),
        refs,
        cond.shots,
    )
    v_parts, a_parts = v_all.chunk(n), a_all.chunk(n)
    if has_refs:
        (v_full, v_ref, v_unc), (a_full, a_ref, a_unc) = v_parts, a_parts
        v = v_unc + guidance.ref_scale * (v_ref - v_unc) + guidance.text_scale * (v_full - v_ref)
        a = a_unc + guidance.ref_scale * (a_ref - a_unc) + guidance.text_scale * (a_full - a_ref)
    else:
        (v_full, v_unc), (a_full, a_unc) = v_parts, a_parts
        v = v_unc + guidance.text_scale * (v_full - v_unc)
        a = a_unc + guidance.text_scale * (a_full - a_unc)
    return v, a


@torch.no_grad()
def sample(
    model: DualBranchDiT,
    video: torch.Tensor,  # (B, Cv, T, H, W) at time times[0]
    audio: torch.Tensor,  # (B, Ca, Na)
    cond: Conditioning,
    times: torch.Tensor,  # (steps + 1,) decreasing to 0
    method: str = "heun",
    guidance: Guidance | None = None,
    keep: KeepLatents | None = None,
    # renoise's fresh noise (CPU, seeded): one generator for the batch, or one per row
    # (rows then draw as they would alone).
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate dx/dt = v from times[0] down to 0 (or, ``renoise``, denoise and
    noise again at each time); returns clean latents."""
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; use one of {METHODS}")
    if method == "renoise" and generator is None:
        raise ValueError("the renoise sampler draws fresh noise: pass a generator")
    guidance = guidance or Guidance(1.0, 1.0)
    keep = keep or KeepLatents()
    ts = [float(x) for x in times]
    video, audio = keep.hold(video, audio)
    for i in range(len(ts) - 1):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        v1, a1 = guided_velocity(model, video, audio, keep.times(t_cur), cond, guidance)
        if method == "renoise":
            video, audio = keep.hold(*_renoised(video, audio, v1, a1, (t_cur, t_next), generator))
            continue
        video_e, audio_e = keep.hold(video + dt * v1, audio + dt * a1)
        if method == "heun" and t_next > 0:
            # Trapezoidal correction; skipped on the last step (t = 0 is not evaluated).
            v2, a2 = guided_velocity(model, video_e, audio_e, keep.times(t_next), cond, guidance)
            video_e, audio_e = keep.hold(video + dt * 0.5 * (v1 + v2), audio + dt * 0.5 * (a1 + a2))
        video, audio = video_e, audio_e
    return video, audio


def _renoised(video, audio, v, a, times: tuple[float, float], generator):
    """The clean latents ``x - t v`` at ``t``, noised afresh to the next time (none at 0)."""
    t_cur, t_next = times
    x0_video, x0_audio = video - t_cur * v, audio - t_cur * a
    if t_next == 0:
        return x0_video, x0_audio
    e_video, e_audio = _fresh_noise(video, audio, generator)
    return (1 - t_next) * x0_video + t_next * e_video, (1 - t_next) * x0_audio + t_next * e_audio


def _fresh_noise(video, audio, generator):
    """Standard normal noise like ``video`` and ``audio`` (video first, then audio)."""
    if not isinstance(generator, list):
        return (torch.randn(video.shape, generator=generator).to(video),
                torch.randn(audio.shape, generator=generator).to(audio))  # fmt: skip
    if len(generator) != video.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {video.shape[0]}")
    rows = [(torch.randn((1, *video.shape[1:]), generator=g),
             torch.randn((1, *audio.shape[1:]), generator=g)) for g in generator]  # fmt: skip
    return (torch.cat([v for v, _ in rows]).to(video), torch.cat([a for _, a in rows]).to(audio))
