"""The synthetic audio-visual world: seeded raw footage with exact ground truth.

``render_shot`` renders one shot of a scene kind; ``generate_video`` joins 3-8 shots
with cuts and fades; ``generate_corpus`` writes MP4s with JSON sidecars to any URI.
See ``core.probes`` for the measurements that read this world back.
"""

from core.synth.corpus import (
    SIDECAR_SCHEMA_VERSION,
    SynthConfig,
    generate_corpus,
    generate_video,
    video_seed,
)
from core.synth.palette import COLOR_NAMES, OBJECT_COLORS, SHAPES
from core.synth.scenes import SCENE_KINDS, SceneError
from core.synth.shot import render_shot
from core.synth.speech import SpeechError

__all__ = [
    "COLOR_NAMES",
    "OBJECT_COLORS",
    "SCENE_KINDS",
    "SHAPES",
    "SIDECAR_SCHEMA_VERSION",
    "SceneError",
    "SpeechError",
    "SynthConfig",
    "generate_corpus",
    "generate_video",
    "render_shot",
    "video_seed",
]
