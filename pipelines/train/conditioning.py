"""Does a trained model follow its reference slots and per-shot prompts? Data and probes.

Used by ``tests/test_train_conditioning.py`` (and ``bench/train_conditioning.py``,
which sweeps recipes): a small synthetic corpus is written as a clips manifest, the
model is trained on it with :func:`pipelines.train.train`, and generated clips are
measured by the synthetic world's colour probe (:func:`core.probes.label_pixels`).

The corpus: ``sources`` raw "videos", each ``shots_per_source`` consecutive one-colour
``bouncing_balls`` shots (64x64, 16 fps, 16 kHz, the ``tiny`` preset's geometry), one
curated clip per shot. Consecutive shots of a source differ in colour, so a multi-shot
sample always pairs two prompts that disagree, and an image reference taken from
another shot of the source shows another colour than the clip. Captions are the
world's own ("a red circle bounces on a gray floor"); a fraction of clips get the
caption with its colour words removed ("a circle bounces on a gray floor"), as real
captions leave things out: on those clips only an image reference of the clip itself
can tell the colour. Every caption says "a gray floor" whatever the shot's backdrop
(gray, beige, slate, charcoal), so the backdrop is a colour that only an image
reference carries.

The manifest is written directly (the columns :mod:`pipelines.train.data` reads)
rather than by the curation flow: the shots are known exactly, so curation would
only re-find them, at a cost (shot detection, scoring, captioning) that a CPU test
budget of a few minutes cannot carry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.media import write_mp4
from core.probes import label_pixels
from core.synth import render_shot
from core.synth.palette import COLOR_NAMES
from core.synth.scenes import SceneError

FPS, SAMPLE_RATE, SIZE = 16.0, 16000, 64


@dataclass
class CorpusSpec:
    sources: int = 10
    shots_per_source: int = 4
    frames_per_shot: int = 17  # 1 + 4k: one frame bucket
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    # Fraction of clips whose caption names no colour.
    colourless_fraction: float = 0.5
    seed: int = 0


def colourless(caption: str) -> str:
    """The caption without colour words: ``a red circle`` -> ``a circle``."""
    words = "|".join(COLOR_NAMES)
    text = re.sub(rf"\b({words})\s+", "", caption)
    return re.sub(r"\ban (?=[^aeiou])", "a ", text)


def _one_colour_shots(spec: CorpusSpec):
    """Endless (seed, clip, truth) of shots whose objects all share one allowed colour."""
    duration = spec.frames_per_shot / FPS
    seed = spec.seed * 100_003
    while True:
        seed += 1
        try:
            clip, truth = render_shot(
                "bouncing_balls", seed, duration, SIZE, SIZE, FPS, SAMPLE_RATE,
                guard_start_s=0.1, guard_end_s=0.1,
            )  # fmt: skip
        except SceneError:
            continue
        colours = {o["color"] for o in truth["objects"]}
        if len(colours) == 1 and colours <= set(spec.colours):
            yield clip, truth


def build_corpus(out_uri: str, spec: CorpusSpec | None = None) -> str:
    """Write clips and ``clips.parquet`` under ``out_uri``; returns the manifest's URI."""
    spec = spec or CorpusSpec()
    shots = _one_colour_shots(spec)
    rng = np.random.default_rng(spec.seed)
    rows = []
    shot_s = spec.frames_per_shot / FPS
    for s in range(spec.sources):
        source_id = f"src{s:03d}"
        previous = None
        for k in range(spec.shots_per_source):
            clip, truth = next(shots)
            while truth["objects"][0]["color"] == previous:
                clip, truth = next(shots)
            previous = truth["objects"][0]["color"]
            clip_id = f"{source_id}-{k:02d}"
            uri = storage.join(out_uri, "clips", f"{clip_id}.mp4")
            write_mp4(uri, clip, crf=16, aac_coder="fast")
            caption = truth["caption"]
            if rng.random() < spec.colourless_fraction:
                caption = colourless(caption)
            rows.append(
                {
                    "clip_id": clip_id,
                    "source_id": source_id,
                    "clip_uri": uri,
                    "start_s": k * shot_s,
                    "end_s": (k + 1) * shot_s,
                    "keep": True,
                    "split": "train",
                    "caption": caption,
                    "transcript": "",
                    "shot_index": k,
                    "score_sync_confidence": 1.0,
                    "has_audio": True,
                    "colour": previous,
                }
            )
    manifest = storage.join(out_uri, "clips.parquet")
    with storage.local_output(manifest) as path:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return manifest


def colour_pixels(frames: np.ndarray) -> dict[str, int]:
    """Pixels of each object colour over (T, H, W, 3) uint8 frames (the probe's labels)."""
    labels = np.stack([label_pixels(np.ascontiguousarray(f)) for f in frames])
    counts = np.bincount(labels.ravel().astype(np.int64) + 1, minlength=len(COLOR_NAMES) + 1)
    return {name: int(counts[i + 1]) for i, name in enumerate(COLOR_NAMES)}


def colour_share(frames: np.ndarray, colour: str) -> float:
    """Fraction of the object-coloured pixels that are ``colour`` (0 when none is seen)."""
    counts = colour_pixels(frames)
    total = sum(counts.values())
    return counts[colour] / total if total else 0.0


def first_frame_of(colour: str, spec: CorpusSpec | None = None, skip: int = 0) -> np.ndarray:
    """First frame of a one-colour shot of ``colour`` that the corpus does not contain
    (seeds far past the corpus's), for use as an image reference."""
    spec = spec or CorpusSpec()
    probe = CorpusSpec(**{**spec.__dict__, "seed": spec.seed + 7919, "colours": (colour,)})
    shots = _one_colour_shots(probe)
    for _ in range(skip):
        next(shots)
    clip, _ = next(shots)
    return clip.frames[0]


# ---------------------------------------------------------------------------------
# Measurements on generated clips.


@dataclass
class GenSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 10
    sampler: str = "heun"
    text_scale: float = 4.0
    ref_scale: float = 1.5


def _mean_counts(clips_frames: list[np.ndarray]) -> dict[str, float]:
    counts = [colour_pixels(f) for f in clips_frames]
    return {c: float(np.mean([k[c] for k in counts])) for c in COLOR_NAMES}


def shares(counts: dict[str, float], colours: tuple[str, ...]) -> dict[str, float]:
    """Each colour's fraction of the object pixels (all colours counted in the total)."""
    total = sum(counts.values())
    return {c: (counts[c] / total if total else 0.0) for c in colours}


def reference_counts(
    pipeline, prompt: str, images: list[np.ndarray], settings: GenSettings | None = None
) -> dict[str, float]:
    """Mean object pixels per colour of one prompt generated with image references."""
    from model.generate import GenerationRequest, ReferenceSet, generate

    settings = settings or GenSettings()
    frames = []
    for seed in settings.seeds:
        request = GenerationRequest(
            prompt=prompt,
            duration_s=CorpusSpec().frames_per_shot / FPS,
            seed=seed,
            steps=settings.steps,
            sampler=settings.sampler,
            text_scale=settings.text_scale,
            ref_scale=settings.ref_scale,
            references=ReferenceSet(images=list(images)) if images else None,
        )
        frames.append(generate(request, pipeline=pipeline).clip.frames)
    return _mean_counts(frames)


def multishot_counts(
    pipeline, prompts: tuple[str, str], settings: GenSettings | None = None, guard: int = 2
) -> list[dict[str, float]]:
    """Mean object pixels per colour in each shot of a two-shot plan (frames within
    ``guard`` of the boundary left out)."""
    from model.generate import GenerationRequest, generate
    from model.multishot import Shot, ShotPlan

    settings = settings or GenSettings()
    shot_s = CorpusSpec().frames_per_shot / FPS
    plan = ShotPlan([Shot(prompts[0], shot_s), Shot(prompts[1], shot_s, transition="cut")])
    per_shot: list[list[np.ndarray]] = [[], []]
    for seed in settings.seeds:
        request = GenerationRequest(
            shots=plan,
            seed=seed,
            steps=settings.steps,
            sampler=settings.sampler,
            text_scale=settings.text_scale,
        )
        frames = generate(request, pipeline=pipeline).clip.frames
        cut = int(round(plan.boundaries_s[0] * FPS))
        per_shot[0].append(frames[: cut - guard])
        per_shot[1].append(frames[cut + guard :])
    return [_mean_counts(f) for f in per_shot]


# ---------------------------------------------------------------------------------
# Backdrops: the scene colour an image reference carries and no caption names (every
# bouncing_balls caption says "a gray floor", whichever backdrop the shot has).

BACKDROPS = ("gray", "beige", "slate", "charcoal")


def backdrop_pixels(frames: np.ndarray) -> dict[str, int]:
    """Background pixels (the probe's label -1) of (T, H, W, 3) frames by nearest day
    backdrop: each backdrop's sky and floor tones both count for it."""
    from core.synth.palette import DAY_BACKGROUNDS

    names, tones = [], []
    for name in BACKDROPS:
        for tone in DAY_BACKGROUNDS[name]:
            names.append(name)
            tones.append(tone)
    tones_arr = np.asarray(tones, np.float32)  # (P, 3)
    counts = dict.fromkeys(BACKDROPS, 0)
    for frame in frames:
        background = label_pixels(np.ascontiguousarray(frame)) < 0
        rgb = frame[background].astype(np.float32)  # (N, 3)
        if not rgb.size:
            continue
        nearest = ((rgb[:, None, :] - tones_arr[None]) ** 2).sum(-1).argmin(1)
        for i, n in zip(*np.unique(nearest, return_counts=True), strict=True):
            counts[names[int(i)]] += int(n)
    return counts


def reference_frame(colour: str, background: str, seed: int = 0) -> np.ndarray:
    """First frame of a one-colour ``bouncing_balls`` shot on a chosen day backdrop,
    from seeds the corpus never uses."""
    spec = CorpusSpec(colours=(colour,), seed=seed + 7919)
    duration = spec.frames_per_shot / FPS
    s = spec.seed * 100_003
    while True:
        s += 1
        try:
            clip, truth = render_shot(
                "bouncing_balls", s, duration, SIZE, SIZE, FPS, SAMPLE_RATE,
                background=background, guard_start_s=0.1, guard_end_s=0.1,
            )  # fmt: skip
        except SceneError:
            continue
        if {o["color"] for o in truth["objects"]} == {colour}:
            return clip.frames[0]


def reference_backdrops(
    pipeline, prompt: str, images: list[np.ndarray], settings: GenSettings | None = None
) -> dict[str, float]:
    """Share of the background pixels nearest each backdrop, over seeds."""
    from model.generate import GenerationRequest, ReferenceSet, generate

    settings = settings or GenSettings()
    counts = dict.fromkeys(BACKDROPS, 0)
    for seed in settings.seeds:
        request = GenerationRequest(
            prompt=prompt,
            duration_s=CorpusSpec().frames_per_shot / FPS,
            seed=seed,
            steps=settings.steps,
            sampler=settings.sampler,
            text_scale=settings.text_scale,
            ref_scale=settings.ref_scale,
            references=ReferenceSet(images=list(images)) if images else None,
        )
        for k, v in backdrop_pixels(generate(request, pipeline=pipeline).clip.frames).items():
            counts[k] += v
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}
