"""Does a generation follow what it was given? Issue 21's quality items, measured.

Each measurement is a :class:`Case`: ground truth rendered by :mod:`core.synth` from
a held-out seed (seeds far past any corpus's, :data:`SEEDS`), the conditioning a
request carries (references, a given branch, a shot plan, an edit source) and what
a generation must show. :func:`score_case` reads a generated clip with the probes
(:mod:`core.probes`) only, so ground truth scores as passing and anything else is
judged the same way whether a model or a test made it. :func:`measure` generates
one clip per case through :func:`model.generate.generate`; :func:`summarise` pools
the rows of one kind into the number ``bench/quality.py`` compares with its target.

==========  ==================================================================  ====================
kind        a clip passes when                                                  pooled as
==========  ==================================================================  ====================
image       the reference subject's (colour, shape) is the generation's         share of clips
            single commonest object; the text names neither (``@image1
            subject``, the reference is its subject in another shot)
video       the objects' centroid path correlates with the reference clip's     mean correlation
            (``@video1 motion``; the reference has other colours and shapes)
audio       the generated audio's tempo (median inter-onset interval) is        share of clips
            within ``TEMPO_TOLERANCE`` of the reference's bpm (``@audio1
            tempo``; the text names no bpm)
v2a         audio onsets match the given video's impacts within one frame       pooled onset F1
a2v         visual pulses match the given soundtrack's beats within one frame   pooled pulse F1
multishot   the subject is seen in every shot of a plan; every planned cut is   share of plans /
            detected within one frame and no cut is detected off the plan       share of cuts
v2v         an SDEdit (day -> night, one colour changed) keeps the source's     mean correlation
            centroid path
==========  ==================================================================  ====================

A generation where a path cannot be measured (under 4 frames with an object)
scores correlation 0: it did not follow the motion.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

import numpy as np

from core.media import AVClip
from core.probes.captions import SHAPE_WORDS, observed_objects, parse_caption
from core.probes.onsets import detect_onsets
from core.probes.probe import probe_clip
from core.synth import palette, render_shot
from core.synth.scenes import SceneError
from pipelines.shipped.quality import (
    HELD_OUT_SEED,
    centroid_path,
    edit_prompts,
    path_correlation,
    second_shot_prompt,
)
from pipelines.train.reference_pairs import Geometry, ReferencePairError, render_reference

KINDS = ("image", "video", "audio", "v2a", "a2v", "multishot", "v2v")
# Held-out seeds of each kind: past the shipped families' (HELD_OUT_SEED + < 1e6).
SEEDS = {k: HELD_OUT_SEED + 1_000_000 + 100_000 * i for i, k in enumerate(KINDS)}
TEMPO_TOLERANCE = 0.05
IMAGE_PROMPT = "an object bounces on a gray floor @image1 subject"
MAX_TRIES = 400


@dataclass
class Case:
    kind: str
    prompt: str
    truth: AVClip  # what a generation that follows perfectly would look like
    request: dict = field(default_factory=dict)  # GenerationRequest fields (not prompt)
    expected: dict = field(default_factory=dict)


def geometry_for(cfg, duration_s: float) -> Geometry:
    """A model's shot geometry, ``duration_s`` long as the model counts frames."""
    return Geometry(
        width=cfg.width, height=cfg.height, fps=float(cfg.fps),
        sample_rate=int(cfg.sample_rate), frames=cfg.frames_for_duration(duration_s),
    )  # fmt: skip


def _render(kind: str, seed: int, g: Geometry, **kw) -> tuple[AVClip, dict]:
    return render_shot(
        kind, seed, g.frames / g.fps, g.width, g.height, g.fps, g.sample_rate,
        guard_start_s=g.guard_s, guard_end_s=g.guard_s, **kw,
    )  # fmt: skip


def _shots(kind: str, scene: str, g: Geometry, count: int, accept, start: int | None = None):
    """(seed, clip, truth) of the first ``count`` held-out shots ``accept`` takes."""
    out, seed = [], SEEDS[kind] if start is None else start
    for _ in range(MAX_TRIES * max(count, 1)):
        if len(out) == count:
            return out
        seed += 1
        try:
            clip, truth = _render(scene, seed, g)
        except SceneError:
            continue
        if accept(truth):
            out.append((seed, clip, truth))
    raise SceneError(f"only {len(out)} of {count} held-out {kind} shots found")


def _one_object(truth: dict) -> bool:
    return len(truth["objects"]) == 1 and bool(parse_caption(truth["caption"]))


def _without_bpm(caption: str) -> str:
    return re.sub(r"\s+at \d+ bpm", "", caption)


# ---------------------------------------------------------------------------------
# Cases: ground truth and the conditioning of each kind.


def image_cases(g: Geometry, count: int) -> list[Case]:
    """Subject reference: the target's one object seen in another shot (another
    position, size, backdrop); the text names no colour and no shape."""
    assert not parse_caption(IMAGE_PROMPT) and not set(IMAGE_PROMPT.split()) & set(SHAPE_WORDS)
    from model.generate import ReferenceSet

    cases = []
    for seed, clip, truth in _shots("image", "bouncing_balls", g, count, _one_object):
        ref = render_reference("image", seed, g)
        obj = truth["objects"][0]
        cases.append(Case(
            "image", IMAGE_PROMPT, clip,
            {"references": ReferenceSet(images=[ref.clip.frames[0]])},
            {"colour": obj["color"], "shape": obj["shape"], "seed": seed},
        ))  # fmt: skip
    return cases


def video_cases(g: Geometry, count: int) -> list[Case]:
    """Motion reference: the target's trajectory in other colours and shapes; the text
    is the target's caption. The truth (the target) moves exactly as the reference."""
    from model.generate import ReferenceSet

    cases = []
    for seed, clip, truth in _shots("video", "bouncing_balls", g, count, _one_object):
        ref = render_reference("video", seed, g)
        cases.append(Case(
            "video", f"{truth['caption']} @video1 motion", clip,
            {"references": ReferenceSet(videos=[ref.clip.frames])},
            {"path": centroid_path(_detections(ref.clip)).tolist(), "seed": seed},
        ))  # fmt: skip
    return cases


def audio_cases(g: Geometry, count: int) -> list[Case]:
    """Tempo reference: another beat at the target's bpm; the text names no bpm."""
    from model.generate import ReferenceSet

    cases, seed = [], SEEDS["audio"]
    for _ in range(MAX_TRIES):
        if len(cases) == count:
            break
        [(seed, clip, truth)] = _shots("audio", "beat_pulse", g, 1, lambda t: True, seed)
        try:
            ref = render_reference("audio", seed, g)
        except ReferencePairError:  # no other seed's beat at this tempo: the next shot
            continue
        cases.append(Case(
            "audio", f"{_without_bpm(truth['caption'])} @audio1 tempo", clip,
            {"references": ReferenceSet(audios=[ref.clip.audio]), "duration_s": clip.duration_s},
            {"bpm": float(ref.shared["bpm"]), "seed": seed},
        ))  # fmt: skip
    return cases


def _event_times(truth: dict, types: tuple[str, ...]) -> list[float]:
    return [e["time_s"] for e in truth["events"] if e["type"] in types]


def v2a_cases(g: Geometry, count: int) -> list[Case]:
    """Sound for a given video of known impacts (bouncing balls and collisions)."""
    from model.generate import GivenMedia

    cases = []
    half = (count + 1) // 2
    for scene, n in (("bouncing_balls", half), ("collision", count - half)):
        has_impacts = lambda t: bool(_event_times(t, ("impact", "collision")))  # noqa: E731
        start = SEEDS["v2a"] + (50_000 if scene == "collision" else 0)
        for seed, clip, truth in _shots("v2a", scene, g, n, has_impacts, start):
            cases.append(Case(
                "v2a", truth["caption"], clip,
                {"given": GivenMedia("v2a", frames=clip.frames, fps=clip.fps)},
                {"events": _event_times(truth, ("impact", "collision")), "seed": seed},
            ))  # fmt: skip
    return cases


def a2v_cases(g: Geometry, count: int) -> list[Case]:
    """Picture for a given beat_pulse soundtrack of known beats; the text names no bpm."""
    from model.generate import GivenMedia

    cases = []
    has_beats = lambda t: len(_event_times(t, ("beat",))) >= 2  # noqa: E731
    for seed, clip, truth in _shots("a2v", "beat_pulse", g, count, has_beats):
        cases.append(Case(
            "a2v", _without_bpm(truth["caption"]), clip,
            {"given": GivenMedia("a2v", audio=clip.audio, sample_rate=clip.sample_rate)},
            {"events": _event_times(truth, ("beat",)), "seed": seed},
        ))  # fmt: skip
    return cases


def _subject_text(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def multishot_cases(g: Geometry, count: int, shots: int = 4, shot_frames: int = 16) -> list[Case]:
    """A plan of ``shots`` shots (day and night in turn, hard cuts) with one subject.
    The truth: the subject's shot filmed again at night and on other day backdrops,
    joined by hard cuts exactly at the plan's boundaries."""
    from model.multishot import Shot, ShotPlan
    from pipelines.train.conditioning import join_shots

    shot_g = Geometry(g.width, g.height, g.fps, g.sample_rate, shot_frames, g.guard_s)
    shot_s = shot_frames / g.fps
    cases = []
    for seed, clip, truth in _shots("multishot", "bouncing_balls", shot_g, count, _one_object):
        obj = truth["objects"][0]
        # The same shot on other backdrops and at night: a cut changes every block.
        others = [b for b in palette.backgrounds("day") if b != truth["background"]]
        pieces = [clip]
        for k in range(1, shots):
            variant = "night" if k % 2 else "day"
            background = None if variant == "night" else others[(k // 2 - 1) % len(others)]
            pieces.append(_render("bouncing_balls", seed, shot_g, variant=variant,
                                  background=background)[0])  # fmt: skip
        prompts = [truth["caption"] if k % 2 == 0 else second_shot_prompt(truth["caption"])
                   for k in range(shots)]  # fmt: skip
        plan = ShotPlan(
            [Shot(p, shot_s, transition="cut") for p in prompts],
            subject=_subject_text(obj["color"], obj["shape"]),
        )
        cases.append(Case(
            "multishot", "", join_shots(pieces, ["cut"] * (shots - 1), 0), {"shots": plan},
            {"subject": [obj["color"], obj["shape"]], "boundaries_s": plan.boundaries_s,
             "seed": seed},
        ))  # fmt: skip
    return cases


def v2v_cases(g: Geometry, count: int, strength: float = 0.6) -> list[Case]:
    """SDEdits of held-out shots (day -> night, one colour changed): the source is the
    truth of its own trajectory."""
    from model.generate import EditSpec

    cases = []
    for seed, clip, truth in _shots("v2v", "bouncing_balls", g, (count + 1) // 2, _one_object):
        prompts = edit_prompts(truth["caption"])
        for name in ("night", "colour"):
            cases.append(Case(
                "v2v", prompts[name], clip,
                {"edit": EditSpec(source=clip, strength=strength)},
                {"path": centroid_path(_detections(clip)).tolist(), "edit": name, "seed": seed},
            ))  # fmt: skip
    return cases[:count]


BUILDERS = {
    "image": image_cases, "video": video_cases, "audio": audio_cases, "v2a": v2a_cases,
    "a2v": a2v_cases, "multishot": multishot_cases, "v2v": v2v_cases,
}  # fmt: skip


def build_cases(cfg, count: int, duration_s: float = 2.0, kinds=KINDS) -> dict[str, list[Case]]:
    """``count`` held-out cases of each kind at a model's geometry. Tempo cases last
    3 s at least, so that even 90 bpm has 3 beats to time."""
    out = {}
    for kind in kinds:
        seconds = max(duration_s, 3.0) if kind == "audio" else duration_s
        out[kind] = BUILDERS[kind](geometry_for(cfg, seconds), count)
    return out


# ---------------------------------------------------------------------------------
# Scores: a generated clip against a case, with the probes only.


def _detections(clip: AVClip) -> list[list[dict]]:
    return probe_clip(clip, include_frames=True)["frames"]


def match_count(predicted: list[float], truth: list[float], tolerance: float) -> int:
    """One-to-one matches within ``tolerance`` (closest pairs first)."""
    pairs = sorted(
        (abs(p - t), i, j)
        for i, p in enumerate(predicted)
        for j, t in enumerate(truth)
        if abs(p - t) <= tolerance
    )
    used_p, used_t, n = set(), set(), 0
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i), used_t.add(j)
            n += 1
    return n


def tempo_bpm(audio: np.ndarray, sample_rate: int) -> float | None:
    """Beats per minute from the median inter-onset interval (None under 3 onsets)."""
    onsets = detect_onsets(audio, sample_rate)
    if len(onsets) < 3:
        return None
    return 60.0 / float(np.median(np.diff(onsets)))


def score_case(case: Case, clip: AVClip) -> dict:
    """What a generated clip did with a case's conditioning; ``passed`` per clip."""
    e, fps = case.expected, float(clip.fps)
    if case.kind == "image":
        seen = observed_objects(_detections(clip))
        want = (e["colour"], e["shape"])
        top = sorted(seen.items(), key=lambda kv: -kv[1])
        single = bool(top) and top[0][0] == want and (len(top) == 1 or top[1][1] < top[0][1])
        return {"seen": [list(k) + [n] for k, n in top], "passed": single}
    if case.kind in ("video", "v2v"):
        cor = path_correlation(np.asarray(e["path"]), centroid_path(_detections(clip)))
        return {"correlation": 0.0 if cor is None else cor, "measured": cor is not None}
    if case.kind == "audio":
        bpm = tempo_bpm(clip.audio, clip.sample_rate)
        err = None if bpm is None else abs(bpm - e["bpm"]) / e["bpm"]
        return {
            "bpm": bpm,
            "relative_error": err,
            "passed": err is not None and err <= TEMPO_TOLERANCE,
        }
    if case.kind in ("v2a", "a2v"):
        if case.kind == "v2a":
            found = detect_onsets(clip.audio, clip.sample_rate)
        else:
            events = probe_clip(clip, include_frames=False)["visual_events"]
            found = [ev["time_s"] for ev in events if ev["type"] == "pulse"]
        matched = match_count(found, e["events"], 1.0 / fps)
        return {"found": len(found), "truth": len(e["events"]), "matched": matched}
    if case.kind == "multishot":
        probe = probe_clip(clip, include_frames=True)
        cuts = [t["time_s"] for t in probe["transitions"]]
        bounds = e["boundaries_s"]
        edges = [0] + [int(round(b * fps)) for b in bounds] + [clip.num_frames]
        subject = tuple(e["subject"])
        kept = [subject in observed_objects(probe["frames"][a + 2 : b - 2])
                for a, b in zip(edges[:-1], edges[1:], strict=True)]  # fmt: skip
        errors = [min((abs(t - b) * fps for t in cuts), default=None) for b in bounds]
        on_plan = [e_ is not None and e_ <= 1.0 for e_ in errors]
        stray = sum(min(abs(t - b) * fps for b in bounds) > 1.0 for t in cuts)
        return {"shots_kept": kept, "subject_kept": all(kept), "cut_errors_frames": errors,
                "cuts_on_plan": sum(on_plan), "cuts": len(bounds), "stray_cuts": stray}  # fmt: skip
    raise ValueError(f"unknown case kind {case.kind!r}; known: {KINDS}")


def _share(flags: list[bool]) -> dict:
    n = len(flags)
    p = sum(flags) / n if n else float("nan")
    return {"value": p, "se": math.sqrt(p * (1 - p) / n) if n else float("nan"), "n": n}


def _mean(values: list[float]) -> dict:
    n = len(values)
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"value": statistics.fmean(values) if n else float("nan"), "se": se, "n": n}


def _f1(rows: list[dict]) -> dict:
    matched = sum(r["matched"] for r in rows)
    found, truth = sum(r["found"] for r in rows), sum(r["truth"] for r in rows)
    precision = matched / found if found else 0.0
    recall = matched / truth if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"value": f1, "precision": precision, "recall": recall,
            "matched": matched, "found": found, "truth": truth, "n": len(rows)}  # fmt: skip


def summarise(kind: str, rows: list[dict]) -> dict:
    """The pooled measures of one kind's rows (see the module's table)."""
    if kind in ("image", "audio"):
        out = {"followed": _share([r["passed"] for r in rows])}
        if kind == "audio":
            errs = [r["relative_error"] for r in rows if r["relative_error"] is not None]
            out["median_relative_error"] = statistics.median(errs) if errs else None
        return out
    if kind in ("video", "v2v"):
        return {"correlation": _mean([r["correlation"] for r in rows]),
                "measured": sum(r["measured"] for r in rows)}  # fmt: skip
    if kind in ("v2a", "a2v"):
        return {"f1": _f1(rows)}
    if kind == "multishot":
        cuts = sum(r["cuts"] for r in rows)
        on_plan = sum(r["cuts_on_plan"] for r in rows)
        stray = sum(r["stray_cuts"] for r in rows)
        share = (on_plan / (cuts + stray)) if cuts + stray else float("nan")
        return {"subject_kept": _share([r["subject_kept"] for r in rows]),
                "cuts_on_plan": {"value": share, "on_plan": on_plan, "cuts": cuts,
                                 "stray": stray, "n": len(rows)}}  # fmt: skip
    raise ValueError(f"unknown case kind {kind!r}; known: {KINDS}")


def measure(pipeline, cases: dict[str, list[Case]], settings) -> dict:
    """Generate one clip per case (seed = its index) and score it: ``{kind: {"rows",
    **summary}}``. ``settings``: :class:`pipelines.shipped.quality.QualitySettings`."""
    from pipelines.shipped.quality import generate_clip

    out = {}
    for kind, kind_cases in cases.items():
        rows = []
        for i, case in enumerate(kind_cases):
            kw = dict(case.request)
            kw.setdefault("duration_s", case.truth.duration_s)
            clip = generate_clip(pipeline, settings, i, prompt=case.prompt, **kw)
            rows.append({"prompt": case.prompt, "seed": case.expected.get("seed"),
                         **score_case(case, clip)})  # fmt: skip
        out[kind] = {**summarise(kind, rows), "rows": rows}
    return out


def all_prompts(cases: dict[str, list[Case]]) -> list[str]:
    """Every text the cases condition on (for a text-embedding table)."""
    out = set()
    for kind_cases in cases.values():
        for case in kind_cases:
            if case.prompt:
                out.add(case.prompt)
            plan = case.request.get("shots")
            if plan is not None:
                out |= {s.prompt for s in plan.shots} | {plan.subject}
    return sorted(out)


# (kind, key of the recipe's [targets], measure of the kind's summary, what it is)
TARGETS = (
    ("image", "image_reference_followed", "followed", "image reference: subject followed"),
    ("video", "video_reference_correlation", "correlation", "video reference: motion correlation"),
    ("audio", "audio_reference_tempo_share", "followed", "audio reference: tempo within 5%"),
    ("v2a", "v2a_onset_f1", "f1", "V2A: onset F1 against the video's impacts"),
    ("a2v", "a2v_pulse_f1", "f1", "A2V: pulse F1 against the given beats"),
    ("multishot", "multishot_subject_kept", "subject_kept", "multi-shot: subject in every shot"),
    ("multishot", "multishot_cuts_on_plan", "cuts_on_plan", "multi-shot: cuts within 1 frame"),
    ("v2v", "v2v_correlation", "correlation", "V2V: trajectory correlation"),
)


def _describe(m: dict) -> str:
    if "se" in m:
        return f"{m['value']:.3f} +- {m['se']:.3f} (n={m['n']})"
    if "precision" in m:
        return (f"{m['value']:.3f} (P {m['precision']:.2f}, R {m['recall']:.2f}: {m['matched']} "
                f"matched, {m['found']} found, {m['truth']} true; n={m['n']})")  # fmt: skip
    return f"{m['value']:.3f} ({m['on_plan']}/{m['cuts']} on plan, {m['stray']} stray; n={m['n']})"


def target_rows(results: dict, targets: dict) -> list[dict]:
    """One row per target of the kinds in ``results`` (:func:`measure`'s): measured,
    bar, met. A measure that could not be computed (no cases) is a miss."""
    rows = []
    for kind, key, measure_name, label in TARGETS:
        if kind not in results:
            continue
        m, bar = results[kind][measure_name], float(targets[key])
        value = m["value"]
        met = value is not None and not math.isnan(value) and value >= bar
        rows.append({"target": label, "measured": _describe(m), "bar": f">= {bar}", "met": met})
    return rows
