"""Probes: measure any video on the synthetic world's terms (pure numpy/scipy).

``probe_clip`` / ``probe_video`` return per-frame colour-segmented detections,
visual events (impacts from velocity kinks, beat pulses), audio onsets, the
audio-video offset (positive = audio late), shot transitions and per-shot object
counts; ``caption_adherence`` scores a caption against detections and
``compare_to_truth`` turns a probe result plus a sidecar into error statistics.
"""

from core.probes.captions import caption_adherence, parse_caption
from core.probes.detect import detect_objects, label_pixels
from core.probes.onsets import detect_onsets
from core.probes.probe import PROBE_SCHEMA_VERSION, compare_to_truth, probe_clip, probe_video
from core.probes.shots import detect_transitions
from core.probes.sync import estimate_av_offset

__all__ = [
    "PROBE_SCHEMA_VERSION",
    "caption_adherence",
    "compare_to_truth",
    "detect_objects",
    "detect_onsets",
    "detect_transitions",
    "estimate_av_offset",
    "label_pixels",
    "parse_caption",
    "probe_clip",
    "probe_video",
]
