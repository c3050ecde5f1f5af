"""``probe_clip`` / ``probe_video``: every measurement of a video in one JSON-able dict,
and ``compare_to_truth``: its errors against a synthetic sidecar.

Two kinds of JSON file sit beside a video under its name: the synthetic world's
ground truth (``core.synth``: ``schema_version``, ``fps``, ``shots`` with
``events``, ``transitions``) and the metadata of a generated clip (``duet
generate``: ``prompt``, ``steps``, ...; ``"kind": "generation"`` since it was
added). :func:`sidecar_kind` tells them apart by their schema, old files included.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from core.media import AVClip
from core.probes.captions import caption_adherence, multiset_iou, observed_objects
from core.probes.detect import MIN_OBJECT_AREA, detect_objects
from core.probes.lipsync import estimate_lip_sync, mouth_track
from core.probes.onsets import detect_onsets
from core.probes.shots import detect_transitions, estimate_pan, segments_from_transitions
from core.probes.sync import MAX_OFFSET_S, estimate_av_offset
from core.probes.tracks import segment_events

PROBE_SCHEMA_VERSION = 1
# A tracked object may move this fraction of the frame's smaller side per frame.
TRACK_GATE_FRACTION = 0.2


def _counter_list(counter: Counter) -> list[dict]:
    return [{"color": c, "shape": s, "count": n} for (c, s), n in sorted(counter.items())]


def probe_clip(
    clip: AVClip,
    include_frames: bool = True,
    max_offset_s: float = MAX_OFFSET_S,
    min_object_area: int = MIN_OBJECT_AREA,
) -> dict:
    """Measure a clip: detections, visual events, audio onsets, AV offset, transitions.

    Returns ``{"schema_version", "fps", "num_frames", "duration_s", "width", "height",
    "sample_rate", "transitions", "shots", "visual_events", "audio_onsets_s",
    "av_offset_ms", "av_matched", "lip_sync_offset_ms", "frames"?}``. Offsets are
    positive when the audio is late. ``frames`` (per-frame detections)
    is left out when ``include_frames`` is False. Components under
    ``min_object_area`` pixels are not objects (see ``detect.min_object_area`` for
    frames under 128 px).
    """
    frames, fps = clip.frames, float(clip.fps)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"clip has no frames: {frames.shape}")
    num_frames, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    detections = [detect_objects(frame, min_object_area) for frame in frames]
    transitions = detect_transitions(frames, fps)
    segments = segments_from_transitions(transitions, num_frames)
    gate = TRACK_GATE_FRACTION * min(height, width)
    visual_events: list[dict] = []
    shots = []
    lip_offsets = []
    for index, segment in enumerate(segments):
        tracks, merged = segment_events(detections, segment, fps, gate)
        lip = None
        face = mouth_track(tracks)
        if face is not None and clip.audio.size:
            lip = estimate_lip_sync(
                np.asarray(face["frames"]) / fps,
                np.asarray(face["lower_hole_px"]),
                clip.audio,
                clip.sample_rate,
                fps,
            )
            if lip is not None:
                lip_offsets.append(lip["offset_ms"])
        for ev in merged:
            ev["shot"] = index
        visual_events.extend(merged)
        a, b = segment
        shots.append(
            {
                "index": index,
                "start_s": round(a / fps, 6),
                "end_s": round(b / fps, 6),
                "objects": _counter_list(observed_objects(detections[a:b])),
                "num_visual_events": len(merged),
                "camera_pan_px_per_s": round(estimate_pan(frames[a:b], fps), 3),
                "lip_sync": lip,
            }
        )
    visual_events.sort(key=lambda e: e["time_s"])
    onsets = detect_onsets(clip.audio, clip.sample_rate) if clip.audio.size else []
    sync = estimate_av_offset([e["time_s"] for e in visual_events], onsets, max_offset_s)
    result = {
        "schema_version": PROBE_SCHEMA_VERSION,
        "fps": fps,
        "num_frames": int(num_frames),
        "duration_s": round(num_frames / fps, 6),
        "width": int(width),
        "height": int(height),
        "sample_rate": int(clip.sample_rate),
        "transitions": transitions,
        "shots": shots,
        "visual_events": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in ev.items()}
            for ev in visual_events
        ],
        "audio_onsets_s": [round(t, 6) for t in onsets],
        "av_offset_ms": sync["av_offset_ms"],
        "av_matched": sync["matched"],
        "lip_sync_offset_ms": round(float(np.median(lip_offsets)), 3) if lip_offsets else None,
    }
    if include_frames:
        result["frames"] = [
            [
                {
                    "color": d["color"],
                    "shape": d["shape"],
                    "x": round(d["x"], 3),
                    "y": round(d["y"], 3),
                    "area": d["area"],
                }
                for d in dets
            ]
            for dets in detections
        ]
    return result


def probe_video(uri: str, include_frames: bool = True) -> dict:
    """``probe_clip`` of a video file at any URI (silent if it has no audio track)."""
    from core.media import read_clip

    # A video without sound still has pictures to measure; its onsets are just empty.
    result = probe_clip(read_clip(uri, require_audio=False), include_frames=include_frames)
    result["video"] = uri
    return result


SIDECAR_TRUTH = "truth"
SIDECAR_GENERATION = "generation"
SIDECAR_UNKNOWN = "unknown"


def sidecar_kind(doc: object) -> str:
    """``"truth"`` for a synthetic ground-truth sidecar, ``"generation"`` for generation
    metadata, ``"unknown"`` for anything else (never compared to a probe)."""
    if not isinstance(doc, dict):
        return SIDECAR_UNKNOWN
    if doc.get("kind") == SIDECAR_GENERATION:
        return SIDECAR_GENERATION
    shots, transitions = doc.get("shots"), doc.get("transitions")
    if (
        isinstance(doc.get("schema_version"), int)
        and isinstance(doc.get("fps"), int | float)
        and isinstance(shots, list)
        and isinstance(transitions, list)
        and all(isinstance(s, dict) and isinstance(s.get("events"), list) for s in shots)
    ):
        return SIDECAR_TRUTH
    # Generation metadata written before it carried "kind".
    # (Its "transitions" is None or a word; ground truth's is a list of events.)
    if isinstance(doc.get("prompt"), str) and "steps" in doc and not isinstance(transitions, list):
        return SIDECAR_GENERATION
    return SIDECAR_UNKNOWN


def _nearest_errors(truth: list[float], measured: list[float], tolerance: float) -> list[float]:
    """Signed error (measured - truth) of each truth time's nearest measurement within tolerance."""
    if not measured:
        return []
    m = np.asarray(sorted(measured))
    errors = []
    for t in truth:
        j = int(np.argmin(np.abs(m - t)))
        if abs(m[j] - t) <= tolerance:
            errors.append(float(m[j] - t))
    return errors


def _stats(errors: list[float], total: int, scale: float) -> dict:
    if not errors:
        return {"count": total, "matched": 0, "recall": 0.0 if total else 1.0}
    e = np.abs(np.asarray(errors)) * scale
    return {
        "count": total,
        "matched": len(errors),
        "recall": round(len(errors) / total, 4) if total else 1.0,
        "mean_abs": round(float(e.mean()), 4),
        "max_abs": round(float(e.max()), 4),
        "mean_signed": round(float(np.mean(errors) * scale), 4),
    }


def compare_to_truth(probe: dict, sidecar: dict) -> dict:
    """Errors of a probe result against the synthetic world's sidecar.

    Visual event errors are in frames, audio onset errors in ms, transition errors
    in frames, camera pan errors in px/s. Attribute accuracy per shot is the multiset IoU of ground-truth
    (colour, shape) objects and the detections in the shot's interior frames.
    Raises ValueError when ``sidecar`` is not ground truth (:func:`sidecar_kind`).
    """
    kind = sidecar_kind(sidecar)
    if kind != SIDECAR_TRUTH:
        raise ValueError(f"not a ground-truth sidecar (it reads as {kind}): nothing to compare")
    fps = float(sidecar["fps"])
    truth_events = [e["time_s"] for s in sidecar["shots"] for e in s["events"]]
    visual = [e["time_s"] for e in probe["visual_events"]]
    onsets = probe["audio_onsets_s"]
    visual_errors = _nearest_errors(truth_events, visual, 2.0 / fps)
    onset_errors = _nearest_errors(truth_events, onsets, 0.03)
    by_type = {}
    for kind in sorted({e["type"] for s in sidecar["shots"] for e in s["events"]}):
        times = [e["time_s"] for s in sidecar["shots"] for e in s["events"] if e["type"] == kind]
        by_type[kind] = _stats(_nearest_errors(times, visual, 2.0 / fps), len(times), fps)

    cuts_truth = [t["time_s"] for t in sidecar["transitions"] if t["type"] == "cut"]
    fades_truth = [t for t in sidecar["transitions"] if t["type"] == "fade"]
    cuts_found = [t["time_s"] for t in probe["transitions"] if t["type"] == "cut"]
    fades_found = [t for t in probe["transitions"] if t["type"] == "fade"]
    cut_errors = _nearest_errors(cuts_truth, cuts_found, 2.0 / fps)
    fade_errors = _nearest_errors(
        [t["time_s"] for t in fades_truth], [t["time_s"] for t in fades_found], 2.0 / fps
    )
    fade_duration_errors = []
    for ft in fades_truth:
        near = [f for f in fades_found if abs(f["time_s"] - ft["time_s"]) <= 2.0 / fps]
        if near:
            fade_duration_errors.append(near[0]["duration_s"] - ft["duration_s"])

    pan_errors = []
    for shot in sidecar["shots"]:
        middle = 0.5 * (shot["start_s"] + shot["end_s"])
        found = [p for p in probe["shots"] if p["start_s"] <= middle < p["end_s"]]
        if found:
            pan_errors.append(found[0]["camera_pan_px_per_s"] - shot["camera_pan_px_per_s"])

    attribute_scores, caption_scores = [], []
    frames = probe.get("frames")
    if frames is not None:
        for shot in sidecar["shots"]:
            # Interior frames only: clear of fade ramps and the cut frame itself.
            margin = shot.get("fade_s", 0.0) / 2.0 + 1.0 / fps
            a = int(np.ceil((shot["start_s"] + margin) * fps))
            end_margin = 1.0 / fps
            nxt = [t for t in sidecar["transitions"] if abs(t["time_s"] - shot["end_s"]) < 1e-6]
            if nxt and nxt[0]["type"] == "fade":
                end_margin += nxt[0]["duration_s"] / 2.0
            b = int(np.floor((shot["end_s"] - end_margin) * fps))
            if b <= a:
                continue
            seen = observed_objects(frames[a:b])
            wanted = Counter((o["color"], o["shape"]) for o in shot["objects"])
            attribute_scores.append(multiset_iou(wanted, seen))
            caption_scores.append(caption_adherence(shot["caption"], frames[a:b]))

    return {
        "visual_event_error_frames": _stats(visual_errors, len(truth_events), fps),
        "visual_event_error_frames_by_type": by_type,
        "extra_visual_events": max(len(visual) - len(visual_errors), 0),
        "audio_onset_error_ms": _stats(onset_errors, len(truth_events), 1000.0),
        "av_offset_ms": probe["av_offset_ms"],
        "lip_sync_offset_ms": probe.get("lip_sync_offset_ms"),
        "cut_error_frames": _stats(cut_errors, len(cuts_truth), fps),
        "extra_cuts": max(len(cuts_found) - len(cut_errors), 0),
        "fade_error_frames": _stats(fade_errors, len(fades_truth), fps),
        "fade_duration_error_frames": _stats(fade_duration_errors, len(fades_truth), fps),
        "extra_fades": max(len(fades_found) - len(fade_errors), 0),
        "camera_pan_error_px_per_s": _stats(pan_errors, len(sidecar["shots"]), 1.0),
        "attribute_accuracy": round(float(np.mean(attribute_scores)), 4)
        if attribute_scores
        else None,
        "caption_adherence": round(float(np.mean(caption_scores)), 4) if caption_scores else None,
    }
