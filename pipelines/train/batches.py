"""DiT training batches from cached latents: text, references and multi-shot sequences.

References are filled from the data, as the model will be used: for a clip of
source S, image slot 0 is the subject, the clip's own first frame (latent frame 0
of the causal VAE is exactly the image latent of frame 0); the other image slots
are first frames of *other* clips of S, video references the openings of other
clips of S, audio references their sound. Each sample draws
its own slot counts (uniform up to 9/3/3) or none at all, so the model sees every
count and absence. Video and audio references are cut to a few latent steps, never
more than the model's ``ref_time_stride``, so their RoPE times never overlap the
clip's or each other's.

A multi-shot batch joins two consecutive clips of one source into one sequence
with per-shot captions (text tokens carry their shot id), the layout multi-shot
generation uses, so per-shot prompt routing is learned rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.dit import ShotLayout, TextConditioning
from model.references import ReferenceLatents, RefSlot
from pipelines.train.config import ReferenceSampling
from pipelines.train.data import ClipRow
from pipelines.train.latents import LatentSample, LatentStore


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
    ):
        self.rows = rows
        self.store = store
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.max_refs = tuple(
            min(a, b)
            for a, b in zip(
                max_refs,
                (sampling.max_images, sampling.max_videos, sampling.max_audios),
                strict=True,
            )
        )
        self.ref_frames = int(min(sampling.max_reference_latent_frames, ref_time_stride))
        self.m = audio_latents_per_video_latent
        by_source: dict[str, list[ClipRow]] = {}
        for row in reference_pool:
            if row.clip_id in store:
                by_source.setdefault(row.source_id, []).append(row)
        self.by_source = {k: sorted(v, key=lambda r: r.start_s) for k, v in by_source.items()}

    # -- single-shot -------------------------------------------------------------
    def build(self, indices: list[int], gen: torch.Generator) -> DiTBatch:
        rows = [self.rows[i] for i in indices]
        samples = [self.store.get(r.clip_id) for r in rows]
        t_lat = min(s.video.shape[1] for s in samples)
        video = torch.stack([s.video[:, :t_lat] for s in samples])
        audio = torch.stack([s.audio[:, : t_lat * self.m] for s in samples])
        tokens, mask, _ = pad_text([s.text for s in samples], None, self.max_tokens)
        return DiTBatch(
            video=video,
            audio=audio,
            text=TextConditioning(tokens, mask),
            text_missing=torch.tensor([s.text.shape[0] == 0 for s in samples]),
            has_audio=torch.tensor([s.has_audio for s in samples]),
            references=self.references(rows, gen),
            clip_ids=tuple(r.clip_id for r in rows),
        )

    def _others(self, row: ClipRow) -> list[ClipRow]:
        return [r for r in self.by_source.get(row.source_id, []) if r.clip_id != row.clip_id]

    def references(self, rows: list[ClipRow], gen: torch.Generator) -> ReferenceLatents | None:
        max_img, max_vid, max_aud = self.max_refs
        picks: list[tuple[list, list, list]] = []
        for row in rows:
            others = self._others(row)
            with_audio = [r for r in others if r.has_audio]
            if (
                not others
                or float(torch.rand(1, generator=gen)) >= self.sampling.reference_probability
            ):
                picks.append(([], [], []))
                continue
            # Image slot 0 is the subject: the clip's own first frame, or absent. The
            # other image slots show first frames of other clips of the source. Were
            # the own frame put in a random slot among the others (as at first), the
            # slots would be exchangeable in the data, so nothing could teach the
            # model which of several images to follow: given a red image in one slot
            # and a blue one in another it could only blend or guess, and swapping
            # two slots could not change the output in any predictable way. With a
            # fixed subject slot the model learns to take the subject from slot 0
            # and to treat the rest as context, which a test can check.
            n_img = _count(max_img, gen)
            images: list[ClipRow | None] = []
            if n_img:
                own = float(torch.rand(1, generator=gen)) < self.sampling.own_frame_probability
                images = [row if own else None] + _choose(others, n_img - 1, gen)
            picks.append(
                (
                    images,
                    _choose(others, _count(max_vid, gen), gen),
                    _choose(with_audio, _count(max_aud, gen), gen),
                )
            )
        if not any(any(p[0]) or p[1] or p[2] for p in picks):
            return None

        def slots(kind: int, limit: int, extract) -> list[RefSlot | None]:
            out: list[RefSlot | None] = []
            for s in range(limit):
                chosen = [p[kind][s] if s < len(p[kind]) else None for p in picks]
                if all(c is None for c in chosen):
                    out.append(None)
                    continue
                latents = [extract(self.store.get(c.clip_id)) if c else None for c in chosen]
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
            images=slots(0, max_img, image),
            videos=slots(1, max_vid, video),
            audios=slots(2, max_aud, audio),
        )
        return None if refs.is_empty() else refs

    # -- multi-shot --------------------------------------------------------------
    def shot_pairs(self) -> list[tuple[ClipRow, ClipRow]]:
        """Consecutive clips of one source (the second starts after the first ends)."""
        wanted = {r.clip_id for r in self.rows}
        pairs = []
        for clips in self.by_source.values():
            for a, b in zip(clips, clips[1:], strict=False):
                if a.clip_id in wanted and b.start_s > a.start_s:
                    pairs.append((a, b))
        return pairs

    def build_multishot(
        self, pairs: list[tuple[ClipRow, ClipRow]], gen: torch.Generator
    ) -> DiTBatch:
        first = [self.store.get(a.clip_id) for a, _ in pairs]
        second = [self.store.get(b.clip_id) for _, b in pairs]
        t_lat = min(s.video.shape[1] for s in first + second)
        video = torch.stack(
            [
                torch.cat([x.video[:, :t_lat], y.video[:, :t_lat]], dim=1)
                for x, y in zip(first, second, strict=True)
            ]
        )
        n_a = t_lat * self.m
        audio = torch.stack(
            [
                torch.cat([x.audio[:, :n_a], y.audio[:, :n_a]], dim=1)
                for x, y in zip(first, second, strict=True)
            ]
        )
        rows, ids = [], []
        for x, y in zip(first, second, strict=True):
            half = self.max_tokens
            tx, ty = x.text[:half], y.text[:half]
            rows.append(torch.cat([tx, ty]))
            ids.append(
                torch.cat(
                    [
                        torch.zeros(tx.shape[0], dtype=torch.long),
                        torch.ones(ty.shape[0], dtype=torch.long),
                    ]
                )
            )
        tokens, mask, shot_ids = pad_text(rows, ids, 2 * self.max_tokens)
        layout = ShotLayout(
            video_latent_shot=torch.cat(
                [torch.zeros(t_lat, dtype=torch.long), torch.ones(t_lat, dtype=torch.long)]
            ),
            audio_latent_shot=torch.cat(
                [torch.zeros(n_a, dtype=torch.long), torch.ones(n_a, dtype=torch.long)]
            ),
        )
        missing = torch.tensor(
            [
                x.text.shape[0] == 0 or y.text.shape[0] == 0
                for x, y in zip(first, second, strict=True)
            ]
        )
        return DiTBatch(
            video=video,
            audio=audio,
            text=TextConditioning(tokens, mask, shot_ids),
            text_missing=missing,
            has_audio=torch.tensor(
                [x.has_audio and y.has_audio for x, y in zip(first, second, strict=True)]
            ),
            shots=layout,
            clip_ids=tuple(f"{a.clip_id}+{b.clip_id}" for a, b in pairs),
        )


def _count(limit: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, limit + 1, (1,), generator=gen)) if limit > 0 else 0


def _choose(pool: list, n: int, gen: torch.Generator) -> list:
    if not pool or n <= 0:
        return []
    order = torch.randperm(len(pool), generator=gen).tolist()
    return [pool[order[i % len(pool)]] for i in range(n)]
