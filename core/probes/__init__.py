"""Probes: measure any video on the synthetic world's terms (pure numpy/scipy).

``probe_clip`` / ``probe_video`` return per-frame colour-segmented detections,
visual events (impacts from velocity kinks, beat pulses), audio onsets, the
audio-video offset (positive = audio late), the lip-sync offset of a talking
face, shot transitions, camera pan speed and per-shot object counts.
``caption_adherence`` scores a caption against detections; ``compare_to_truth``
turns a probe result plus a synthetic sidecar into error statistics.
"""

from core.probes.captions import caption_adherence, parse_caption
from core.probes.detect import detect_objects, label_pixels
from core.probes.lipsync import estimate_lip_sync
from core.probes.onsets import detect_onsets
from core.probes.probe import PROBE_SCHEMA_VERSION, compare_to_truth, probe_clip, probe_video
from core.probes.shots import detect_transitions, estimate_pan
from core.probes.sync import estimate_av_offset

__all__ = [
    "PROBE_SCHEMA_VERSION",
    "caption_adherence",
    "compare_to_truth",
    "detect_objects",
    "detect_onsets",
    "detect_transitions",
    "estimate_av_offset",
    "estimate_lip_sync",
    "estimate_pan",
    "label_pixels",
    "parse_caption",
    "probe_clip",
    "probe_video",
]
