"""DiT training batches from cached latents: text and references.

References are taught by role (:mod:`pipelines.train.reference_pairs`): each
reference of a clip shares one attribute with it -- its subject's appearance
(image), its motion (video), its tempo or voice (audio) -- and, with
``binding_probability``, the caption is followed by an @-binding per reference
that names its slot and role (``@image2 subject``; :mod:`model.reference_binding`),
encoded apart and appended to the cached caption tokens exactly as generation
encodes a prompt with bindings. Slots are filled in random order, so only the
binding says which slot holds what. Pairs come from the dataset's pair table
(exact synthetic pairs) or, without one, from other shots of the clip's source.
Each sample draws its own slot counts per kind (uniform up to the limits, never
more than its distinct pairs) or none at all.

Image-to-video is a mode of its own: with ``i2v_probability`` the clip's own first
frame (latent frame 0 of the causal VAE is exactly the image latent of frame 0)
fills the I2V slot, the model's last image slot, flagged per sample in
``DiTBatch.i2v``. Video and audio references are cut to a few latent steps, never
more than the model's ``ref_time_stride``, so their RoPE times never overlap the
clip's or each other's.

Multi-shot batches are continuous footage of 2..N shots encoded once
(:mod:`pipelines.train.sequences`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.dit import ShotLayout, TextConditioning
from model.reference_binding import binding_phrase, join_tokens
from model.references import ReferenceLatents, RefSlot
from pipelines.train.config import ReferenceSampling
from pipelines.train.data import ClipRow
from pipelines.train.latents import LatentSample, LatentStore
from pipelines.train.reference_pairs import KINDS, ReferencePair, same_source_pairs


@dataclass
class DiTBatch:
    video: torch.Tensor  # (B, Cv, T, h, w) clean latents
    audio: torch.Tensor  # (B, Ca, Na)
    text: TextConditioning
    text_missing: torch.Tensor  # (B,) bool: no caption, always trained as unconditional
    has_audio: torch.Tensor  # (B,) bool: audio loss counts
    references: ReferenceLatents | None = None
    shots: ShotLayout | None = None
    clip_ids: tuple[str, ...] = ()
    i2v: torch.Tensor | None = None  # (B,) bool: own first frame in the I2V slot
    bindings: tuple[tuple[str, ...], ...] = ()  # per sample: @-binding phrases appended


@dataclass
class ReferenceDraw:
    """What :meth:`BatchBuilder.references` drew for a batch."""

    latents: ReferenceLatents | None
    i2v: torch.Tensor  # (B,) bool
    bindings: list[list[str]] = field(default_factory=list)  # per sample, in token order
    roles: list[list[ReferencePair]] = field(default_factory=list)  # per sample


def pad_text(rows: list[torch.Tensor], shot_ids: list[torch.Tensor] | None, max_tokens: int):
    """(B, L, D) tokens, (B, L) mask and optional (B, L) shot ids from ragged rows."""
    b = len(rows)
    length = max(1, min(max_tokens, max(r.shape[0] for r in rows)))
    dim = rows[0].shape[1]
    tokens = torch.zeros(b, length, dim)
    mask = torch.zeros(b, length, dtype=torch.bool)
    ids = torch.full((b, length), -1, dtype=torch.long) if shot_ids is not None else None
    for i, row in enumerate(rows):
        n = min(length, row.shape[0])
        tokens[i, :n] = row[:n]
        mask[i, :n] = True
        if ids is not None:
            ids[i, :n] = shot_ids[i][:n]
    return tokens, mask, ids


class BatchBuilder:
    def __init__(
        self,
        rows: list[ClipRow],
        reference_pool: list[ClipRow],
        store: LatentStore,
        sampling: ReferenceSampling,
        max_tokens: int,
        max_refs: tuple[int, int, int],
        ref_time_stride: float,
        audio_latents_per_video_latent: int,
        pairs: list[ReferencePair] | None = None,
        binder: Callable[[str], torch.Tensor] | None = None,
    ):
        """``pairs``: the dataset's reference pairs (None: other shots of each clip's
        source). ``binder``: (L, D) text tokens of a binding phrase (the text
        encoder's ``embed_tokens``); None appends no binding tokens."""
        self.rows = rows
        self.store = store
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.max_refs_model = tuple(max_refs)
        self.max_refs = tuple(
            min(a, b)
            for a, b in zip(
                max_refs,
                (sampling.max_images, sampling.max_videos, sampling.max_audios),
                strict=True,
            )
        )
        # The model's last image slot is the I2V slot; role images use the others.
        self.i2v_slot = max_refs[0] - 1
        self.role_limits = (min(self.max_refs[0], self.i2v_slot), *self.max_refs[1:])
        i2v = sampling.own_frame_probability
        self.i2v_probability = sampling.i2v_probability if i2v is None else i2v
        for name, p in (("i2v_probability", self.i2v_probability),
                        ("binding_probability", sampling.binding_probability)):  # fmt: skip
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.ref_frames = int(min(sampling.max_reference_latent_frames, ref_time_stride))
        self.m = audio_latents_per_video_latent
        self.binder = binder
        self.by_id = {r.clip_id: r for r in reference_pool if r.clip_id in store}
        if pairs is None:
            pairs = same_source_pairs(
                [(r.clip_id, r.source_id, r.shot_index) for r in self.by_id.values()]
            )
        self.pairs = _index_pairs(pairs, self.by_id)

    # -- single-shot -------------------------------------------------------------
    def build(self, indices: list[int], gen: torch.Generator) -> DiTBatch:
        rows = [self.rows[i] for i in indices]
        samples = [self.store.get(r.clip_id) for r in rows]
        t_lat = min(s.video.shape[1] for s in samples)
        video = torch.stack([s.video[:, :t_lat] for s in samples])
        audio = torch.stack([s.audio[:, : t_lat * self.m] for s in samples])
        draw = self.references(rows, gen)
        texts = [
            self._text(s.text, phrases) for s, phrases in zip(samples, draw.bindings, strict=True)
        ]
        tokens, mask, _ = pad_text(texts, None, max(t.shape[0] for t in texts))
        return DiTBatch(
            video=video,
            audio=audio,
            text=TextConditioning(tokens, mask),
            # A sample with bindings but no caption still has text: the bindings.
            text_missing=torch.tensor([t.shape[0] == 0 for t in texts]),
            has_audio=torch.tensor([s.has_audio for s in samples]),
            references=draw.latents,
            clip_ids=tuple(r.clip_id for r in rows),
            i2v=draw.i2v,
            bindings=tuple(tuple(b) for b in draw.bindings),
        )

    def _text(self, caption: torch.Tensor, phrases: list[str]) -> torch.Tensor:
        """The caption's tokens (cut to the model's budget) then each binding's."""
        caption = caption[: self.max_tokens]
        if not phrases or self.binder is None:
            return caption
        return join_tokens([caption] + [self.binder(p) for p in phrases], caption.shape[1])

    def references(self, rows: list[ClipRow], gen: torch.Generator) -> ReferenceDraw:
        """Role references, I2V frames and bindings for a batch's rows."""
        i2v = torch.rand(len(rows), generator=gen) < self.i2v_probability
        # picks[k][i]: sample i's {slot: pair} of kind k
        picks: list[list[dict[int, ReferencePair]]] = [[{} for _ in rows] for _ in KINDS]
        bindings: list[list[str]] = []
        for i, row in enumerate(rows):
            pool = self.pairs.get(row.clip_id, {})
            phrases: list[str] = []
            if pool and float(torch.rand(1, generator=gen)) < self.sampling.reference_probability:
                bind = float(torch.rand(1, generator=gen)) < self.sampling.binding_probability
                for k, kind in enumerate(KINDS):
                    chosen = _choose(pool.get(kind, []), _count(self.role_limits[k], gen), gen)
                    for slot, pair in zip(self._slots(len(chosen), k, gen), chosen, strict=True):
                        picks[k][i][slot] = pair
                        if bind:
                            phrases.append(binding_phrase(kind, slot, pair.word))
                if phrases:
                    order = torch.randperm(len(phrases), generator=gen).tolist()
                    phrases = [phrases[j] for j in order]
            bindings.append(phrases)
        roles = [
            [picks[k][i][s] for k in range(3) for s in sorted(picks[k][i])]
            for i in range(len(rows))
        ]

        def slots(k: int, limit: int, extract) -> list[RefSlot | None]:
            out: list[RefSlot | None] = []
            for s in range(limit):
                chosen = [self._clip_at(picks, k, s, i, row, i2v) for i, row in enumerate(rows)]
                if all(c is None for c in chosen):
                    out.append(None)
                    continue
                latents = [extract(self.store.get(c)) if c else None for c in chosen]
                like = next(x for x in latents if x is not None)
                stacked = torch.stack(
                    [x if x is not None else torch.zeros_like(like) for x in latents]
                )
                present = torch.tensor([c is not None for c in chosen])
                out.append(RefSlot(stacked, present))
            while out and out[-1] is None:
                out.pop()
            return out

        def image(s: LatentSample) -> torch.Tensor:
            return s.video[:, :1]  # (Cv, 1, h, w): the image latent of the clip's first frame

        def video(s: LatentSample) -> torch.Tensor:
            return s.video[:, : self.ref_frames]

        def audio(s: LatentSample) -> torch.Tensor:
            return s.audio[:, : self.ref_frames * self.m]

        refs = ReferenceLatents(
            images=slots(0, self.max_refs_model[0], image),
            videos=slots(1, self.role_limits[1], video),
            audios=slots(2, self.role_limits[2], audio),
        )
        return ReferenceDraw(None if refs.is_empty() else refs, i2v, bindings, roles)

    def _slots(self, n: int, k: int, gen: torch.Generator) -> list[int]:
        """Slots for n references of kind k: a random choice among the role slots
        (the first n when not shuffled)."""
        if not self.sampling.shuffle_slots:
            return list(range(n))
        return torch.randperm(self.role_limits[k], generator=gen)[:n].tolist()

    def _clip_at(self, picks, k: int, slot: int, i: int, row: ClipRow, i2v) -> str | None:
        """Clip id whose latents fill slot ``slot`` of kind ``k`` for sample i."""
        if k == 0 and slot == self.i2v_slot:
            return row.clip_id if bool(i2v[i]) else None
        pair = picks[k][i].get(slot)
        return None if pair is None else pair.reference


def _count(limit: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, limit + 1, (1,), generator=gen)) if limit > 0 else 0


def _choose(pool: list, n: int, gen: torch.Generator) -> list:
    """Up to n distinct items of pool, in random order."""
    if not pool or n <= 0:
        return []
    order = torch.randperm(len(pool), generator=gen).tolist()
    return [pool[j] for j in order[:n]]


def _index_pairs(
    pairs: list[ReferencePair], clips: dict[str, ClipRow]
) -> dict[str, dict[str, list[ReferencePair]]]:
    """clip id -> kind -> its pairs with the clip as target. A pair shares one
    attribute, which works both ways, so each pair also serves its reference as a
    target. Pairs with a clip outside the cache, and audio references of clips
    without sound, are left out; duplicates count once."""
    out: dict[str, dict[str, list[ReferencePair]]] = {}
    seen = set()
    for p in pairs:
        for target, ref in ((p.target, p.reference), (p.reference, p.target)):
            key = (target, ref, p.kind)
            if key in seen or target not in clips or ref not in clips or target == ref:
                continue
            if p.kind == "audio" and not clips[ref].has_audio:
                continue
            seen.add(key)
            flipped = ReferencePair(target, ref, p.kind, p.attribute, p.exact)
            out.setdefault(target, {}).setdefault(p.kind, []).append(flipped)
    return out
