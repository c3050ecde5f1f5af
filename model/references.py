"""Reference conditioning: up to 9 images, 3 video clips and 3 audio tracks.

References are encoded by our own VAEs (images as one-frame videos) into latents,
patch-embedded by the owning branch's input projection, tagged with a learned
per-kind, per-slot embedding and appended *in context* to that branch's token
sequence (images and video clips to the video branch, audio tracks to the audio
branch). In RoPE space each reference sits at its own negative time so it never
shares a temporal position with the clip being generated.

Absent references cost nothing: a slot given as ``None`` (or present in no sample
of the batch) contributes no token at all, so adding absent slots changes no output
bit. A slot present in some samples but not others is padded and masked out of
attention for the samples that lack it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.configs import DiTConfig
from model.rope import audio_positions, video_positions

MAX_IMAGE_REFS = 9
MAX_VIDEO_REFS = 3
MAX_AUDIO_REFS = 3


def check_reference_counts(
    n_images: int,
    n_videos: int,
    n_audios: int,
    limits: tuple[int, int, int] = (MAX_IMAGE_REFS, MAX_VIDEO_REFS, MAX_AUDIO_REFS),
) -> None:
    for kind, n, limit in zip(
        ("image", "video", "audio"), (n_images, n_videos, n_audios), limits, strict=True
    ):
        if n > limit:
            raise ValueError(f"too many {kind} references: {n} given, at most {limit} allowed")


@dataclass
class RefSlot:
    """One reference slot for a batch: its latent and which samples have it."""

    latent: torch.Tensor  # video kinds (B, C, T', h, w); audio (B, L, Na)
    present: torch.Tensor | None = None  # (B,) bool; None = every sample

    def any_present(self) -> bool:
        return self.present is None or bool(self.present.any())


@dataclass
class ReferenceLatents:
    """Per-kind lists of slots; ``None`` entries are absent slots."""

    images: list[RefSlot | None] = field(default_factory=list)
    videos: list[RefSlot | None] = field(default_factory=list)
    audios: list[RefSlot | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_reference_counts(len(self.images), len(self.videos), len(self.audios))

    def is_empty(self) -> bool:
        slots = self.images + self.videos + self.audios
        return not any(s is not None and s.any_present() for s in slots)


@dataclass
class RefTokens:
    tokens: torch.Tensor  # (B, N_ref, D)
    positions: torch.Tensor  # (N_ref, 3) for video, (N_ref,) for audio
    present: torch.Tensor | None  # (B, N_ref) bool, None when every token is present


class ReferenceEmbedder(nn.Module):
    """Learned per-kind, per-slot embeddings and the token/position assembly."""

    def __init__(self, cfg: DiTConfig, video_dim: int, audio_dim: int):
        super().__init__()
        check_reference_counts(cfg.max_image_refs, cfg.max_video_refs, cfg.max_audio_refs)
        self.cfg = cfg
        self.image_slots = nn.Parameter(torch.randn(cfg.max_image_refs, video_dim) * 0.02)
        self.video_slots = nn.Parameter(torch.randn(cfg.max_video_refs, video_dim) * 0.02)
        self.audio_slots = nn.Parameter(torch.randn(cfg.max_audio_refs, audio_dim) * 0.02)

    def _check_limits(self, refs: ReferenceLatents) -> None:
        check_reference_counts(
            len(refs.images),
            len(refs.videos),
            len(refs.audios),
            (self.cfg.max_image_refs, self.cfg.max_video_refs, self.cfg.max_audio_refs),
        )

    def video_tokens(self, refs: ReferenceLatents, patchify, embed, patch: int) -> RefTokens | None:
        """Image and video-clip references -> tokens for the video branch."""
        self._check_limits(refs)
        stride = self.cfg.ref_time_stride
        groups = [
            (s, slot, self.image_slots[s], -(s + 1) * stride) for s, slot in enumerate(refs.images)
        ]
        groups += [
            (s, slot, self.video_slots[s], -(self.cfg.max_image_refs + s + 1) * stride)
            for s, slot in enumerate(refs.videos)
        ]
        tokens, positions, present = [], [], []
        for _, slot, slot_embedding, time_offset in groups:
            if slot is None or not slot.any_present():
                continue
            lat = slot.latent
            if lat.dim() != 5:
                raise ValueError(
                    f"video-branch reference latents must be 5D, got {tuple(lat.shape)}"
                )
            _, _, t, h, w = lat.shape
            tok = embed(patchify(lat, patch)) + slot_embedding  # (B, t*h*w/p^2, D)
            tokens.append(tok)
            positions.append(video_positions(t, h // patch, w // patch, time_offset))
            present.append(_token_presence(slot, tok))
        return _assemble(tokens, positions, present)

    def audio_tokens(
        self, refs: ReferenceLatents, embed, latents_per_video_latent: int
    ) -> RefTokens | None:
        """Audio-track references -> tokens for the audio branch."""
        self._check_limits(refs)
        stride = self.cfg.ref_time_stride
        tokens, positions, present = [], [], []
        for s, slot in enumerate(refs.audios):
            if slot is None or not slot.any_present():
                continue
            lat = slot.latent
            if lat.dim() != 3:
                raise ValueError(
                    f"audio reference latents must be (B, L, N), got {tuple(lat.shape)}"
                )
            tok = embed(lat.transpose(1, 2)) + self.audio_slots[s]  # (B, Na, D)
            tokens.append(tok)
            positions.append(
                audio_positions(lat.shape[-1], latents_per_video_latent, -(s + 1) * stride)
            )
            present.append(_token_presence(slot, tok))
        return _assemble(tokens, positions, present)


def _token_presence(slot: RefSlot, tok: torch.Tensor) -> torch.Tensor | None:
    if slot.present is None:
        return None
    return slot.present.to(tok.device)[:, None].expand(-1, tok.shape[1])


def _assemble(tokens, positions, present) -> RefTokens | None:
    if not tokens:
        return None
    mask = None
    if any(p is not None for p in present):
        mask = torch.cat(
            [
                p if p is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
                for p, t in zip(present, tokens, strict=True)
            ],
            dim=1,
        )
    return RefTokens(torch.cat(tokens, dim=1), torch.cat(positions, dim=0), mask)
