"""Reference pairs taught by role: a target clip and a reference that share one attribute.

A reference is only useful to the model if the data say *what* to take from it. A
reference that shares everything with the target (its own first frame) teaches
copying; one that shares nothing teaches ignoring it. So each pair here shares
exactly one attribute, the role's, and the prompt names the role with an @-binding
(:mod:`model.reference_binding`):

======  ===================  ===========  =============================================
kind    attribute            prompt word  the reference, rendered from the target's seed
======  ===================  ===========  =============================================
image   ``appearance``       subject      same colour and shape; another position,
                                          size and backdrop
video   ``trajectory``       motion       same positions over time (and camera path);
                                          other colours, shapes and backdrop
audio   ``tempo``            tempo        same beats per minute; other objects, colours,
                                          backdrop and beat phase
======  ===================  ===========  =============================================

The synthetic world renders such pairs exactly: the target's shot plan is re-made
from its seed as :func:`core.synth.render_shot` makes it, and the reference is a
copy of that plan with every other attribute swapped (or, for tempo, another seed's
plan with the same tempo). On real corpora the same roles come from other shots of
the source (``same_source``: image and video) and from the same speaker's other
turns (``speaker``: audio, where the manifest has WhisperX diarization labels in a
``speaker`` column; without them audio pairs are skipped and the reason returned).

Pairs are stored beside the clips table as ``reference_pairs.parquet``, one row per
(target, reference, kind), with a ``schema_version`` column. A dataset without the
table (made before pairs existed) is read as having none: training then derives the
same-source pairs from the clips table. A table of another schema version is
refused with :class:`ReferencePairError`.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.media import AVClip
from core.synth import palette
from core.synth.captions import describe_objects, plural_verb
from core.synth.raster import shape_extent
from core.synth.scenes import (
    SceneError,
    ShotPlan,
    ShotSpec,
    ground_truth,
    plan_shot,
    render_audio,
    render_frames,
)

PAIRS_SCHEMA_VERSION = 1
PAIRS_TABLE = "reference_pairs.parquet"
KINDS = ("image", "video", "audio")
# attribute -> (kind, the word the prompt binds it with)
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "appearance": ("image", "subject"),
    "trajectory": ("video", "motion"),
    "tempo": ("audio", "tempo"),
    "speaker": ("audio", "voice"),
    # Real corpora: another shot of the same source (its subject and camera style).
    "same_source_image": ("image", "subject"),
    "same_source_video": ("video", "motion"),
}
# The synthetic role of each kind, and the scene kind its targets are drawn from.
SYNTH_ROLES = {"image": "appearance", "video": "trajectory", "audio": "tempo"}
PAIRS_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("target_clip_id", pa.string()),
        ("reference_clip_id", pa.string()),
        ("kind", pa.string()),  # image | video | audio: which reference slot it fills
        ("attribute", pa.string()),  # what the two share (ATTRIBUTES)
        ("word", pa.string()),  # the role word of its @-binding in the prompt
        ("exact", pa.bool_()),  # rendered to share exactly this attribute (synthetic)
        ("seed", pa.int64()),  # the target's seed (-1 for real footage)
        ("shared", pa.string()),  # JSON: the shared attribute's value
    ]
)
# Attempts at a reference plan that differs from the target where it must.
MAX_ATTEMPTS = 500


class ReferencePairError(ValueError):
    """A reference pair cannot be rendered, or a pair table cannot be read."""


@dataclass(frozen=True)
class ReferencePair:
    target: str  # clip id
    reference: str  # clip id
    kind: str  # image | video | audio
    attribute: str
    exact: bool = False

    @property
    def word(self) -> str:
        return ATTRIBUTES[self.attribute][1]


@dataclass(frozen=True)
class Geometry:
    """Shot geometry of rendered pairs (the conditioning corpus's by default)."""

    width: int = 64
    height: int = 64
    fps: float = 16.0
    sample_rate: int = 16000
    frames: int = 17
    guard_s: float = 0.1

    def spec(self) -> ShotSpec:
        return ShotSpec(
            width=self.width,
            height=self.height,
            fps=float(self.fps),
            sample_rate=int(self.sample_rate),
            duration_s=self.frames / self.fps,
            variant="day",
            guard_start_s=self.guard_s,
            guard_end_s=self.guard_s,
            min_event_gap_s=0.12,
        )


@dataclass
class RenderedReference:
    clip: AVClip
    truth: dict
    kind: str
    attribute: str
    shared: dict  # the shared attribute's value, e.g. {"color": "red", "shape": "circle"}


# ---------------------------------------------------------------------------------
# Plans from seeds, exactly as core.synth.render_shot draws them.


def plan_from_seed(
    scene: str, seed: int, geometry: Geometry, background: str | None = None
) -> tuple[ShotPlan, np.random.Generator]:
    """The plan ``render_shot(scene, seed, ...)`` renders, and its generator after
    planning (the audio draws from it next)."""
    spec = geometry.spec()
    rng = np.random.default_rng(seed)
    pick = int(rng.integers(0, 1 << 30))  # render_shot draws the backdrop first
    names = list(palette.backgrounds("day"))
    plan = plan_shot(scene, rng, spec)
    plan.background = background or names[pick % len(names)]
    return plan, rng


def render_plan(plan: ShotPlan, geometry: Geometry, rng: np.random.Generator):
    spec = geometry.spec()
    frames = render_frames(plan, spec)
    audio = render_audio(plan, spec, rng)
    clip = AVClip(frames=frames, fps=spec.fps, audio=audio, sample_rate=spec.sample_rate)
    return clip, ground_truth(plan, spec)


def _derived_seed(seed: int, role: str, attempt: int) -> int:
    """A seed of its own per (target seed, role, attempt), far from corpus seeds."""
    return (zlib.crc32(f"{seed}/{role}/{attempt}".encode()) << 8) + 1_000_000_007


def _caption(plan: ShotPlan) -> str:
    described = describe_objects(plan.objects)
    if plan.kind == "bouncing_balls":
        return f"{described} {plural_verb(plan.objects, 'bounces', 'bounce')} on a gray floor"
    if plan.kind == "day_night":
        verb = plural_verb(plan.objects, "bounces", "bounce")
        return f"{described} {verb} on a floor {'in daylight' if plan.variant == 'day' else 'at night'}"
    if plan.kind == "beat_pulse":
        verb = plural_verb(plan.objects, "pulses", "pulse")
        return f"{described} {verb} to a beat at {int(plan.bpm)} bpm"
    raise ReferencePairError(
        f"reference pairs are rendered for bouncing_balls, day_night and beat_pulse, not {plan.kind}"
    )


def _other_backdrop(background: str, rng: np.random.Generator) -> str:
    names = [n for n in palette.backgrounds("day") if n != background]
    return names[int(rng.integers(0, len(names)))]


def _recolour(plan: ShotPlan, colours: list[str], shapes: list[str]) -> None:
    """Give object i colour ``colours[i]`` and shape ``shapes[i]``; an object on the
    floor stays on it (another shape reaches lower or higher below its centroid)."""
    floor_objects = plan.kind in ("bouncing_balls", "day_night")
    for i, obj in enumerate(plan.objects):
        if floor_objects:
            old = shape_extent(obj["shape"], obj["radius_px"])[1]
            new = shape_extent(shapes[i], obj["radius_px"])[1]
            plan.xy[i, :, 1] += old - new
        obj["color"], obj["shape"] = colours[i], shapes[i]
    plan.caption = _caption(plan)


def _keep_first_object(plan: ShotPlan) -> None:
    plan.objects = [dict(plan.objects[0], id=0)]
    plan.xy, plan.scale = plan.xy[:1].copy(), plan.scale[:1].copy()
    plan.events = [e for e in plan.events if e["object_ids"] == [0]]
    plan.caption = _caption(plan)


# ---------------------------------------------------------------------------------
# The synthetic pair builders: one per role.


def appearance_reference(
    seed: int, geometry: Geometry, scene: str = "bouncing_balls", colours=None
) -> RenderedReference:
    """Image role: the target's subject (colour and shape of its first object) alone
    in another seed's shot: another position, size, backdrop and motion."""
    del colours  # the subject keeps the target's colour
    target, _ = plan_from_seed(scene, seed, geometry)
    subject = target.objects[0]
    x0, y0 = target.xy[0, 0]
    for attempt in range(MAX_ATTEMPTS):
        ref_seed = _derived_seed(seed, "appearance", attempt)
        try:
            plan, rng = plan_from_seed(scene, ref_seed, geometry)
        except SceneError:
            continue
        _keep_first_object(plan)
        obj = plan.objects[0]
        size_ratio = obj["radius_px"] / subject["radius_px"]
        moved = np.hypot(*(plan.xy[0, 0] - (x0, y0)))
        if abs(np.log(size_ratio)) < np.log(1.25) or moved < 0.2 * geometry.width:
            continue
        plan.background = _other_backdrop(target.background, rng)
        _recolour(plan, [subject["color"]], [subject["shape"]])
        clip, truth = render_plan(plan, geometry, rng)
        shared = {"color": subject["color"], "shape": subject["shape"]}
        return RenderedReference(clip, truth, "image", "appearance", shared)
    raise ReferencePairError(f"no appearance reference found for seed {seed}")


def trajectory_reference(
    seed: int, geometry: Geometry, scene: str = "bouncing_balls", colours=None
) -> RenderedReference:
    """Video role: the target's plan (every position at every frame, the camera's
    pan) with other colours, other shapes, another backdrop and other sounds."""
    colours = tuple(colours or palette.COLOR_NAMES)
    plan, _ = plan_from_seed(scene, seed, geometry)
    rng = np.random.default_rng(_derived_seed(seed, "trajectory", 0))
    used = {o["color"] for o in plan.objects}
    free = [c for c in colours if c not in used]
    if not free:
        raise ReferencePairError(f"no colour left for a trajectory reference: {colours}")
    new_colour = free[int(rng.integers(0, len(free)))]
    new_shapes = []
    for obj in plan.objects:
        others = [s for s in palette.SHAPES if s != obj["shape"]]
        new_shapes.append(others[int(rng.integers(0, len(others)))])
    plan.background = _other_backdrop(plan.background, rng)
    _recolour(plan, [new_colour] * len(plan.objects), new_shapes)
    clip, truth = render_plan(plan, geometry, rng)
    shared = {"trajectory_of": seed}
    return RenderedReference(clip, truth, "video", "trajectory", shared)


def tempo_reference(
    seed: int, geometry: Geometry, scene: str = "beat_pulse", colours=None
) -> RenderedReference:
    """Audio role: another seed's beat at the target's tempo (other objects, colours,
    backdrop, sounds and beat phase)."""
    if scene != "beat_pulse":
        raise ReferencePairError(f"tempo pairs need beat_pulse targets, not {scene}")
    colours = tuple(colours or palette.COLOR_NAMES)
    target, _ = plan_from_seed(scene, seed, geometry)
    used = {o["color"] for o in target.objects}
    free = [c for c in colours if c not in used]
    if not free:
        raise ReferencePairError(f"no colour left for a tempo reference: {colours}")
    first_beat = target.events[0]["time_s"]
    for attempt in range(MAX_ATTEMPTS):
        plan, rng = plan_from_seed(scene, _derived_seed(seed, "tempo", attempt), geometry)
        if plan.bpm != target.bpm or abs(plan.events[0]["time_s"] - first_beat) < 0.05:
            continue
        colour = free[int(rng.integers(0, len(free)))]
        plan.background = _other_backdrop(target.background, rng)
        _recolour(plan, [colour] * len(plan.objects), [o["shape"] for o in plan.objects])
        clip, truth = render_plan(plan, geometry, rng)
        return RenderedReference(clip, truth, "audio", "tempo", {"bpm": float(target.bpm)})
    raise ReferencePairError(f"no tempo reference found for seed {seed}")


BUILDERS = {
    "image": appearance_reference,
    "video": trajectory_reference,
    "audio": tempo_reference,
}
TARGET_SCENES = {"image": "bouncing_balls", "video": "bouncing_balls", "audio": "beat_pulse"}


def render_reference(
    kind: str, seed: int, geometry: Geometry | None = None, scene: str | None = None, colours=None
) -> RenderedReference:
    """The reference of ``kind`` for the target ``render_shot(scene, seed, ...)``."""
    if kind not in BUILDERS:
        raise ReferencePairError(f"unknown reference kind {kind!r}; known: {KINDS}")
    return BUILDERS[kind](seed, geometry or Geometry(), scene or TARGET_SCENES[kind], colours)


# ---------------------------------------------------------------------------------
# Real corpora: pairs from the clips table.


def same_source_pairs(clips: list[tuple[str, str, int]]) -> list[ReferencePair]:
    """Image and video pairs of (clip id, source id, shot index) triples: every other
    clip of the source from another shot (one of the same shot would share
    everything, which teaches copying, not a role)."""
    by_source: dict[str, list[tuple[str, int]]] = {}
    for clip_id, source, shot in clips:
        by_source.setdefault(source, []).append((clip_id, shot))
    pairs = []
    for members in by_source.values():
        for a, shot_a in members:
            for b, shot_b in members:
                if a != b and shot_a != shot_b:
                    pairs.append(ReferencePair(a, b, "image", "same_source_image"))
                    pairs.append(ReferencePair(a, b, "video", "same_source_video"))
    return pairs


def source_pairs(table: pa.Table) -> tuple[list[ReferencePair], list[str]]:
    """Pairs of a curated clips table (kept clips) and the reasons for any kind left
    out. Image and video: :func:`same_source_pairs`. Audio: the same speaker's other
    clips of the source, from the WhisperX diarization label in a ``speaker`` column."""
    rows = [r for r in table.to_pylist() if r.get("keep", True)]
    pairs = same_source_pairs(
        [(r["clip_id"], r["source_id"], int(r.get("shot_index") or 0)) for r in rows]
    )
    if "speaker" not in table.column_names:
        reason = (
            "audio: the manifest has no 'speaker' column (WhisperX diarization was not "
            "run), so no clip can be matched to its speaker's other turns"
        )
        return pairs, [reason]
    turns: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("speaker") and r.get("has_audio", True):
            turns.setdefault((r["source_id"], r["speaker"]), []).append(r)
    for members in turns.values():
        for a in members:
            for b in members:
                if a["clip_id"] != b["clip_id"]:
                    pairs.append(ReferencePair(a["clip_id"], b["clip_id"], "audio", "speaker"))
    return pairs, []


def load_pairs(clips_table_uri: str, table: pa.Table) -> tuple[list[ReferencePair], list[str]]:
    """A dataset's pairs: its pair table's (exact pairs) when it has one, else the
    clips table's :func:`source_pairs`; and the reasons for kinds left out."""
    stored = read_pairs(pairs_table_uri(clips_table_uri))
    if stored is not None:
        return stored, []
    return source_pairs(table)


# ---------------------------------------------------------------------------------
# The pair table.


def pairs_table_uri(clips_table_uri: str) -> str:
    """``reference_pairs.parquet`` in the clips table's directory."""
    parent = clips_table_uri.rsplit("/", 1)[0] if "/" in clips_table_uri else "."
    return storage.join(parent, PAIRS_TABLE)


def write_pairs(uri: str, rows: list[dict]) -> str:
    """Write pair rows (``target_clip_id``, ``reference_clip_id``, ``kind``,
    ``attribute``, ``exact``, ``seed``, ``shared``) as the versioned table."""
    full = []
    for r in rows:
        if r["attribute"] not in ATTRIBUTES or ATTRIBUTES[r["attribute"]][0] != r["kind"]:
            raise ReferencePairError(f"attribute {r['attribute']!r} is not a {r['kind']} role")
        full.append(
            {
                "schema_version": PAIRS_SCHEMA_VERSION,
                "word": ATTRIBUTES[r["attribute"]][1],
                **r,
                "shared": json.dumps(r.get("shared", {}), sort_keys=True),
            }
        )
    table = pa.Table.from_pylist(full, schema=PAIRS_SCHEMA).replace_schema_metadata(
        {b"duet.schema_version": str(PAIRS_SCHEMA_VERSION).encode()}
    )
    with storage.local_output(uri) as path:
        pq.write_table(table, path)
    return uri


def read_pairs(uri: str) -> list[ReferencePair] | None:
    """The pairs of a table, or None when there is none (a dataset from before pairs)."""
    if not storage.exists(uri):
        return None
    with storage.local_copy(uri) as path:
        table = pq.read_table(path)
    # The version is in the table's metadata and in every row; both must be ours.
    found = (
        {str(v) for v in table.column("schema_version").to_pylist()}
        if ("schema_version" in table.column_names)
        else set()
    )
    meta = (table.schema.metadata or {}).get(b"duet.schema_version")
    found |= {meta.decode()} if meta else {"none"}
    if found != {str(PAIRS_SCHEMA_VERSION)}:
        raise ReferencePairError(
            f"{uri}: reference pair schema version {', '.join(sorted(found))}, this code "
            f"reads version {PAIRS_SCHEMA_VERSION}; rebuild the pairs with this version"
        )
    pairs = []
    for r in table.to_pylist():
        if r["attribute"] not in ATTRIBUTES or ATTRIBUTES[r["attribute"]][0] != r["kind"]:
            raise ReferencePairError(f"{uri}: {r['attribute']!r} is not a {r['kind']} role")
        pairs.append(
            ReferencePair(
                r["target_clip_id"],
                r["reference_clip_id"],
                r["kind"],
                r["attribute"],
                bool(r["exact"]),
            )
        )
    return pairs
