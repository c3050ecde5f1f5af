"""Does a trained model follow its reference slots and per-shot prompts? Data and probes.

Used by ``bench/quality.py`` and ``tests/`` (and ``bench/train_conditioning.py``,
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

Each source is also written as multi-shot footage: ``sequence_max_shots`` or fewer
(at least 2) consecutive shots of it in ONE file, joined by hard cuts or dips to
black as the synthetic world films them, with a ``sequences.parquet`` row (shot start
frames, transitions, the shots' captions, and a subject: the first caption without
its colour, since colour is what changes from shot to shot here); see
:mod:`pipelines.train.sequences`.

With ``reference_kinds`` set, the corpus also carries reference pairs taught by
role (:mod:`pipelines.train.reference_pairs`): for each clip an image reference
(its subject's colour and shape elsewhere) and a video reference (its trajectory in
other colours and shapes), and ``tempo_shots`` beat clips with an audio reference at
the same tempo, each rendered from the target's seed, listed in
``reference_pairs.parquet``.

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
from core.media import AVClip, write_mp4
from core.probes import label_pixels
from core.synth import render_shot
from core.synth.palette import COLOR_NAMES
from core.synth.scenes import SceneError
from pipelines.train.reference_pairs import Geometry, pairs_table_uri, render_reference, write_pairs
from pipelines.train.sequences import table_uri, write_sequences

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
    # Multi-shot footage: shots per source's sequence (2..this), the chance that a
    # boundary is a fade rather than a cut, and a fade's length (dip to black).
    sequence_max_shots: int = 4
    fade_probability: float = 0.4
    fade_frames: int = 8
    # Reference pairs by role (pipelines.train.reference_pairs), rendered from each
    # target's seed and written as reference_pairs.parquet beside the clips table:
    # "image" (same subject appearance elsewhere) and "video" (same trajectory, other
    # colours and shapes) for every corpus clip; "audio" adds ``tempo_shots``
    # beat_pulse clips, each with a reference at the same tempo. Each reference is a
    # clip of its own source (so no same-source reference is drawn from it) and a
    # training clip too. Empty: the corpus as before, no pair table.
    reference_kinds: tuple[str, ...] = ()
    tempo_shots: int = 8


def colourless(caption: str) -> str:
    """The caption without colour words: ``a red circle`` -> ``a circle``."""
    words = "|".join(COLOR_NAMES)
    text = re.sub(rf"\b({words})\s+", "", caption)
    return re.sub(r"\ban (?=[^aeiou])", "a ", text)


def _one_colour_shots(spec: CorpusSpec, scene: str = "bouncing_balls", first: int = 0):
    """Endless (seed, clip, truth) of shots whose objects all share one allowed colour."""
    duration = spec.frames_per_shot / FPS
    seed = spec.seed * 100_003 + first
    while True:
        seed += 1
        try:
            clip, truth = render_shot(
                scene, seed, duration, SIZE, SIZE, FPS, SAMPLE_RATE,
                guard_start_s=0.1, guard_end_s=0.1,
            )  # fmt: skip
        except SceneError:
            continue
        colours = {o["color"] for o in truth["objects"]}
        if len(colours) == 1 and colours <= set(spec.colours):
            yield seed, clip, truth


def join_shots(clips: list[AVClip], transitions: list[str], fade_frames: int) -> AVClip:
    """Shots as one piece of footage: hard cuts, or fades (picture and sound ramp
    down over the last ``fade_frames / 2`` frames of a shot and up over the first of
    the next, as core.synth.corpus films them). No padding anywhere."""
    fps, rate = clips[0].fps, clips[0].sample_rate
    frames = np.concatenate([c.frames for c in clips]).astype(np.float32)
    audio = np.concatenate([c.audio for c in clips], axis=1).astype(np.float32)
    starts = np.cumsum([0] + [c.num_frames for c in clips])[1:-1]
    half = fade_frames / 2 / fps
    for start, kind in zip(starts, transitions, strict=True):
        if kind != "fade":
            continue
        boundary = start / fps
        frames *= np.clip(np.abs(np.arange(len(frames)) / fps - boundary) / half, 0, 1)[
            :, None, None, None
        ]
        audio *= np.clip(np.abs(np.arange(audio.shape[1]) / rate - boundary) / half, 0, 1)
    return AVClip(frames=np.rint(frames).astype(np.uint8), fps=fps, audio=audio, sample_rate=rate)


def _sequence(out_uri, source_id, clips, captions, spec: CorpusSpec, rng) -> dict:
    """2..sequence_max_shots consecutive shots of a source as one file, and its row."""
    count = int(rng.integers(2, min(spec.sequence_max_shots, len(clips)) + 1))
    first = int(rng.integers(0, len(clips) - count + 1))
    transitions = [
        "fade" if rng.random() < spec.fade_probability else "cut" for _ in range(count - 1)
    ]
    picked = clips[first : first + count]
    footage = join_shots(picked, transitions, spec.fade_frames)
    sequence_id = f"{source_id}-seq"
    uri = storage.join(out_uri, "sequences", f"{sequence_id}.mp4")
    write_mp4(uri, footage, lossless=True, aac_coder="fast")
    return {
        "sequence_id": sequence_id,
        "source_id": source_id,
        "sequence_uri": uri,
        "fps": FPS,
        "num_frames": footage.num_frames,
        "shot_start_frames": np.cumsum([0] + [c.num_frames for c in picked[:-1]]).tolist(),
        "transitions": transitions,
        "shot_captions": captions[first : first + count],
        "subject": colourless(captions[first]),
        "has_audio": True,
        "split": "train",
    }


def build_corpus(out_uri: str, spec: CorpusSpec | None = None) -> str:
    """Write clips and ``clips.parquet`` (and the sources' multi-shot footage and
    ``sequences.parquet``) under ``out_uri``; returns the clips manifest's URI."""
    spec = spec or CorpusSpec()
    if spec.shots_per_source >= 2 and spec.sequence_max_shots < 2:
        raise ValueError(f"sequence_max_shots must be >= 2, got {spec.sequence_max_shots}")
    # Its own random stream: adding sequences leaves the clips and captions as they were.
    seq_rng = np.random.default_rng([spec.seed, 1])
    sequences = []
    shots = _one_colour_shots(spec)
    rng = np.random.default_rng(spec.seed)
    rows, pairs = [], []
    shot_s = spec.frames_per_shot / FPS
    unknown = set(spec.reference_kinds) - {"image", "video", "audio"}
    if unknown:
        raise ValueError(f"reference_kinds: unknown kinds {sorted(unknown)}")

    def add(clip_id, source_id, k, clip, truth):
        uri = storage.join(out_uri, "clips", f"{clip_id}.mp4")
        # Lossless: the same frames every time the corpus is built (core.media.write_mp4).
        write_mp4(uri, clip, lossless=True, aac_coder="fast")
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
                "colour": truth["objects"][0]["color"],
            }
        )

    def add_references(seed, clip_id, kinds, scene):
        for kind in kinds:
            ref = render_reference(kind, seed, _pair_geometry(spec), scene, spec.colours)
            ref_id = f"{clip_id}~{kind}"
            add(ref_id, ref_id, 0, ref.clip, ref.truth)
            pairs.append(
                {
                    "target_clip_id": clip_id, "reference_clip_id": ref_id, "kind": kind,
                    "attribute": ref.attribute, "exact": True, "seed": seed,
                    "shared": ref.shared,
                }
            )  # fmt: skip

    visual = [k for k in spec.reference_kinds if k != "audio"]
    for s in range(spec.sources):
        source_id = f"src{s:03d}"
        previous = None
        source_clips, captions = [], []
        for k in range(spec.shots_per_source):
            seed, clip, truth = next(shots)
            while truth["objects"][0]["color"] == previous:
                seed, clip, truth = next(shots)
            previous = truth["objects"][0]["color"]
            clip_id = f"{source_id}-{k:02d}"
            add(clip_id, source_id, k, clip, truth)
            source_clips.append(clip)
            captions.append(rows[-1]["caption"])
            add_references(seed, clip_id, visual, "bouncing_balls")
        if spec.shots_per_source >= 2:
            sequences.append(_sequence(out_uri, source_id, source_clips, captions, spec, seq_rng))
    if "audio" in spec.reference_kinds:
        beats = _one_colour_shots(spec, "beat_pulse", first=50_000)
        for j in range(spec.tempo_shots):
            seed, clip, truth = next(beats)
            clip_id = f"tempo{j:03d}"
            add(clip_id, clip_id, 0, clip, truth)
            add_references(seed, clip_id, ["audio"], "beat_pulse")
    manifest = storage.join(out_uri, "clips.parquet")
    with storage.local_output(manifest) as path:
        pq.write_table(pa.Table.from_pylist(rows), path)
    if pairs:
        write_pairs(pairs_table_uri(manifest), pairs)
    if sequences:
        write_sequences(table_uri(manifest), sequences)
    return manifest


def _pair_geometry(spec: CorpusSpec) -> Geometry:
    return Geometry(SIZE, SIZE, FPS, SAMPLE_RATE, spec.frames_per_shot, 0.1)


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
    _, clip, _ = next(shots)
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
