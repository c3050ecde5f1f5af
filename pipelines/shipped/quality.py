"""Quality of a checkpoint on held-out prompts, measured with the synthetic world's probes.

Held-out prompts are captions of shots rendered fresh from seeds far past any
corpus's (:func:`held_out_shots`), minus any caption that occurs in the training
manifest, so neither the exact prompt nor the clip was trained on. Each family of
measurement generates clips with :func:`model.generate.generate` and probes them
with :func:`core.probes.probe.probe_clip`:

- ``text``: colour, shape and count adherence (of the (colour, shape) pairs the
  prompt names, the share seen; counts exact), the multiset IoU, the audio-video
  offset (median |offset| over clips where the probe pairs >= 2 impacts with
  onsets), and onset precision / recall against visual impacts (matched within
  one video frame, pooled over clips);
- ``edit``: SDEdit of a held-out rendered shot, day -> night and one colour changed;
  the correlation of the object centroid's path with the source's (x and y
  series, mean), and whether the edit took (night: mean luma fell; colour: the new
  colour is seen);
- ``multishot``: a two-shot plan with the same subject: the subject's colour and
  shape seen in both shots, and the detected cut's distance from the plan's;
- ``reference``: an image reference of a coloured ball, the text naming no colour:
  whether the reference colour is the most common object colour.

Issue 21's conditioning items (references by role, V2A, A2V, four-shot plans, V2V,
each against its target) are measured by :mod:`pipelines.shipped.conditioning_quality`.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

import numpy as np

from core.probes.captions import observed_objects, parse_caption
from core.probes.probe import probe_clip
from core.synth import render_shot
from core.synth.palette import COLOR_NAMES
from core.synth.scenes import SceneError

HELD_OUT_SEED = 9_000_000
KINDS = ("bouncing_balls", "collision", "beat_pulse", "day_night", "camera_pan", "talking_avatar")


@dataclass
class QualitySettings:
    steps: int = 12
    sampler: str = "heun"
    text_scale: float = 4.0
    ref_scale: float = 1.5
    duration_s: float = 2.0
    edit_strength: float = 0.6


def held_out_shots(cfg, count: int, exclude: set[str], kinds=KINDS, seed: int = HELD_OUT_SEED):
    """``count`` (caption, clip, truth) of fresh shots at the model's geometry whose
    captions name a coloured shape and are not in ``exclude``; kinds in turn."""
    out, s = [], seed
    duration = cfg.frames_for_duration(2.0) / cfg.fps + 0.05
    while len(out) < count:
        kind = kinds[len(out) % len(kinds)]
        s += 1
        try:
            clip, truth = render_shot(
                kind, s, duration, cfg.width, cfg.height, cfg.fps, cfg.sample_rate,
                guard_start_s=0.1, guard_end_s=0.1,
            )  # fmt: skip
        except SceneError:
            continue
        caption = truth["caption"]
        if caption in exclude or not parse_caption(caption):
            continue
        out.append((caption, clip, truth))
    return out


def generate_clip(pipeline, settings: QualitySettings, seed: int = 0, **kw):
    from model.generate import GenerationRequest, generate

    request = GenerationRequest(
        seed=seed, steps=settings.steps, sampler=settings.sampler,
        text_scale=settings.text_scale, ref_scale=settings.ref_scale, **kw,
    )  # fmt: skip
    return generate(request, pipeline=pipeline).clip


def attribute_scores(prompt: str, detections) -> dict:
    wanted = parse_caption(prompt)
    seen = observed_objects(detections)
    colours = {c for c, _ in wanted}
    shapes = {s for _, s in wanted}
    keys = set(wanted) | set(seen)
    inter = sum(min(wanted.get(k, 0), seen.get(k, 0)) for k in keys)
    union = sum(max(wanted.get(k, 0), seen.get(k, 0)) for k in keys)
    return {
        "colour": len(colours & {c for c, _ in seen}) / len(colours),
        "shape": len(shapes & {s for _, s in seen}) / len(shapes),
        "pair": sum(1 for k in wanted if seen.get(k, 0)) / len(wanted),
        "count": float(all(seen.get(k, 0) == n for k, n in wanted.items())),
        "iou": inter / union if union else 1.0,
    }


def _matches(a: list[float], b: list[float], tol: float) -> int:
    b_arr = np.asarray(b, dtype=np.float64)
    if not b_arr.size:
        return 0
    return int(sum(np.min(np.abs(b_arr - t)) <= tol for t in a))


def text_quality(pipeline, shots, settings: QualitySettings, seed: int = 0) -> dict:
    rows = []
    fps = pipeline.config.fps
    for caption, _, _ in shots:
        clip = generate_clip(
            pipeline, settings, seed, prompt=caption, duration_s=settings.duration_s
        )
        probe = probe_clip(clip, include_frames=True)
        visual = [e["time_s"] for e in probe["visual_events"]]
        onsets = probe["audio_onsets_s"]
        rows.append(
            {
                "prompt": caption,
                **attribute_scores(caption, probe["frames"]),
                "av_offset_ms": probe["av_offset_ms"],
                "visual_events": len(visual),
                "onsets": len(onsets),
                "visual_matched": _matches(visual, onsets, 1.0 / fps),
                "onsets_matched": _matches(onsets, visual, 1.0 / fps),
            }
        )
    offsets = [abs(r["av_offset_ms"]) for r in rows if r["av_offset_ms"] is not None]
    n_visual = sum(r["visual_events"] for r in rows)
    n_onsets = sum(r["onsets"] for r in rows)
    return {
        "clips": len(rows),
        **{k: statistics.fmean(r[k] for r in rows) for k in ("colour", "shape", "pair", "count", "iou")},
        "av_offset_clips": len(offsets),
        "median_abs_av_offset_ms": statistics.median(offsets) if offsets else None,
        "frame_ms": 1000.0 / fps,
        "onset_recall": sum(r["visual_matched"] for r in rows) / n_visual if n_visual else None,
        "onset_precision": sum(r["onsets_matched"] for r in rows) / n_onsets if n_onsets else None,
        "visual_events": n_visual,
        "audio_onsets": n_onsets,
        "rows": rows,
    }  # fmt: skip


def centroid_path(detections) -> np.ndarray:
    """(T, 2) mean centre of the detected objects per frame (nan where none)."""
    out = np.full((len(detections), 2), np.nan)
    for i, dets in enumerate(detections):
        if dets:
            out[i] = [np.mean([d["x"] for d in dets]), np.mean([d["y"] for d in dets])]
    return out


def path_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ok = ~(np.isnan(a).any(1) | np.isnan(b).any(1))
    if ok.sum() < 4:
        return None
    cors = []
    for axis in (0, 1):
        x, y = a[ok, axis], b[ok, axis]
        if x.std() < 1e-6 or y.std() < 1e-6:
            cors.append(1.0 if np.abs(x - y).max() < 2.0 else 0.0)  # both still: same place?
        else:
            cors.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(cors))


def _luma(frames: np.ndarray) -> float:
    return float((frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114])).mean())


def edit_prompts(caption: str) -> dict[str, str]:
    """The day -> night and colour-change prompts of an edit of a captioned shot."""
    colours = [c for c, _ in parse_caption(caption)]
    old = colours[0]
    new = next(c for c in ("red", "blue", "green", "yellow", "magenta") if c not in colours)
    return {
        "night": re.sub(r"in daylight|on a gray floor", "on a floor at night", caption),
        "colour": re.sub(rf"\b{old}\b", new, caption, count=1),
        "new_colour": new,
    }


def second_shot_prompt(caption: str) -> str:
    """The second shot of a multi-shot plan: the same subject, at night."""
    return re.sub(r"on a gray floor|on a floor in daylight", "on a floor at night", caption)


REFERENCE_PROMPT = "a circle bounces on a gray floor"


def all_prompts(text_shots, edit_shots, multishot_shots) -> list[str]:
    """Every text the families condition on (for a text-embedding table)."""
    out = {caption for caption, _, _ in text_shots} | {REFERENCE_PROMPT}
    for caption, _, _ in edit_shots:
        p = edit_prompts(caption)
        out |= {p["night"], p["colour"]}
    for caption, _, _ in multishot_shots:
        out |= {caption, second_shot_prompt(caption)}
    return sorted(out)


def edit_quality(pipeline, shots, settings: QualitySettings) -> dict:
    from model.generate import EditSpec

    rows = []
    for caption, clip, _ in shots:
        colours = [c for c, _ in parse_caption(caption)]
        if not colours:
            continue
        src = probe_clip(clip, include_frames=True)["frames"]
        new = edit_prompts(caption)["new_colour"]
        for name, prompt in edit_prompts(caption).items():
            if name == "new_colour":
                continue
            spec = EditSpec(source=clip, strength=settings.edit_strength)
            out = generate_clip(pipeline, settings, 0, prompt=prompt, edit=spec)
            det = probe_clip(out, include_frames=True)["frames"]
            took = (
                _luma(out.frames) < _luma(clip.frames) - 5
                if name == "night"
                else new in {c for c, _ in observed_objects(det)}
            )
            rows.append(
                {
                    "kind": name,
                    "prompt": prompt,
                    "correlation": path_correlation(centroid_path(src), centroid_path(det)),
                    "took": bool(took),
                }
            )
    out = {}
    for name in ("night", "colour"):
        sel = [r for r in rows if r["kind"] == name]
        cors = [r["correlation"] for r in sel if r["correlation"] is not None]
        out[name] = {
            "edits": len(sel),
            "measured": len(cors),
            "median_correlation": statistics.median(cors) if cors else None,
            "share_ge_0.9": sum(c >= 0.9 for c in cors) / len(cors) if cors else None,
            "edit_took": sum(r["took"] for r in sel) / len(sel) if sel else None,
        }
    out["rows"] = rows
    return out


def multishot_plan(caption: str):
    """The two-shot plan measured for a held-out caption: it, then a cut to its
    subject at night."""
    from model.multishot import Shot, ShotPlan

    return ShotPlan([Shot(caption, 1.5), Shot(second_shot_prompt(caption), 1.5, transition="cut")])


def multishot_quality(pipeline, shots, settings: QualitySettings) -> dict:
    rows = []
    fps = pipeline.config.fps
    for caption, _, _ in shots:
        wanted = parse_caption(caption)
        subject = next(iter(wanted))
        plan = multishot_plan(caption)
        clip = generate_clip(pipeline, settings, 0, shots=plan)
        probe = probe_clip(clip, include_frames=True)
        boundary = plan.boundaries_s[0]
        cut = int(round(boundary * fps))
        kept = []
        for a, b in ((0, cut - 2), (cut + 2, clip.num_frames)):
            seen = observed_objects(probe["frames"][a:b])
            kept.append(subject in seen)
        cuts = [t["time_s"] for t in probe["transitions"]]
        err = min((abs(t - boundary) for t in cuts), default=None)
        rows.append(
            {
                "prompt": caption,
                "subject": list(subject),
                "both_shots": all(kept),
                "transition_error_frames": None if err is None else err * fps,
            }
        )
    errs = [r["transition_error_frames"] for r in rows if r["transition_error_frames"] is not None]
    return {
        "plans": len(rows),
        "subject_kept": sum(r["both_shots"] for r in rows) / len(rows),
        "transition_found": len(errs) / len(rows),
        "transition_within_1_frame": sum(e <= 1.0 for e in errs) / len(rows),
        "rows": rows,
    }


def reference_quality(pipeline, settings: QualitySettings, count: int = 8) -> dict:
    from model.generate import ReferenceSet

    cfg = pipeline.config
    rows = []
    colours = ("red", "blue", "green", "yellow")
    s = HELD_OUT_SEED + 500_000
    while len(rows) < count:
        s += 1
        try:
            clip, truth = render_shot(
                "bouncing_balls", s, 1.2, cfg.width, cfg.height, cfg.fps, cfg.sample_rate,
                guard_start_s=0.1, guard_end_s=0.1,
            )  # fmt: skip
        except SceneError:
            continue
        found = {o["color"] for o in truth["objects"]}
        if len(found) != 1 or not found <= set(colours):
            continue
        colour = found.pop()
        prompt = REFERENCE_PROMPT
        out = generate_clip(
            pipeline, settings, len(rows), prompt=prompt, duration_s=settings.duration_s,
            references=ReferenceSet(images=[clip.frames[0]]),
        )  # fmt: skip
        seen = observed_objects(probe_clip(out, include_frames=True)["frames"])
        by_colour = {c: sum(n for (cc, _), n in seen.items() if cc == c) for c in COLOR_NAMES}
        top = max(by_colour, key=by_colour.get) if any(by_colour.values()) else None
        rows.append({"reference_colour": colour, "top_colour": top, "followed": top == colour})
    return {
        "clips": len(rows),
        "followed": sum(r["followed"] for r in rows) / len(rows),
        "chance": 1 / len(colours),
        "rows": rows,
    }


# Per-clip measures of each family that a paired comparison reads: (family, row key,
# measure name). Rows are matched by what identifies their clip, so two runs on the
# same held-out prompts compare prompt by prompt and the draw mostly cancels.
PAIRED_MEASURES = (
    ("text", "colour", "colour adherence"),
    ("text", "shape", "shape adherence"),
    ("text", "pair", "(colour, shape) pairs"),
    ("text", "count", "count exact"),
    ("text", "iou", "multiset IoU"),
    ("text", "abs_av_offset_ms", "absolute AV offset, ms (clips both measured)"),
    ("edit", "correlation", "V2V trajectory correlation"),
    ("multishot", "both_shots", "multi-shot subject kept"),
    ("reference", "followed", "image reference colour followed"),
)


def _row_id(family: str, index: int, row: dict) -> tuple:
    if family == "edit":
        return (row["kind"], row["prompt"])
    if family == "reference":  # the same seeds give the same references in both runs
        return (index, row["reference_colour"])
    return (row["prompt"],)


def _row_value(row: dict, key: str) -> float | None:
    if key == "abs_av_offset_ms":
        value = row.get("av_offset_ms")
        return None if value is None else abs(float(value))
    value = row.get(key)
    return None if value is None else float(value)


def compare_runs(old: dict, new: dict) -> list[dict]:
    """Paired ``new - old`` (mean, standard error, pairs) of every per-clip measure both
    eval runs (:mod:`pipelines.shipped.eval_job` outputs) hold, matched clip by clip."""
    from pipelines.align.evaluate import mean_se

    out = []
    for family, key, name in PAIRED_MEASURES:
        old_rows = (old.get(family) or {}).get("rows") or []
        new_rows = (new.get(family) or {}).get("rows") or []
        index = {_row_id(family, i, r): r for i, r in enumerate(old_rows)}
        pairs = []
        for i, row in enumerate(new_rows):
            match = index.get(_row_id(family, i, row))
            a = None if match is None else _row_value(match, key)
            b = _row_value(row, key)
            if a is not None and b is not None:
                pairs.append((a, b))
        if not pairs:
            continue
        diff, se = mean_se([b - a for a, b in pairs])
        out.append({
            "family": family, "measure": name, "pairs": len(pairs),
            "old": statistics.fmean(a for a, _ in pairs),
            "new": statistics.fmean(b for _, b in pairs),
            "diff": diff, "se": se,
        })  # fmt: skip
    return out


def comparison_table(rows: list[dict]) -> str:
    """Markdown table of :func:`compare_runs`."""
    lines = [
        "| family | measure | pairs | old | new | new - old |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['measure']} | {r['pairs']} | {r['old']:.3f} | "
            f"{r['new']:.3f} | {r['diff']:+.3f} +- {r['se']:.3f} |"
        )
    return "\n".join(lines)
