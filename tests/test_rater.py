"""The programmatic rater at the ``tiny`` preset's 64x64: it must see the world's own
small balls (recall) and nothing that is not there (precision), since it is both the
alignment stages' reward and their evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from core.media import AVClip, read_clip, write_mp4
from core.probes.detect import min_object_area
from core.synth import render_shot
from core.synth.palette import COLOR_NAMES, background_prototypes
from core.synth.scenes import SceneError
from pipelines.align.rater import rate_clip

SIZE, FPS, RATE = 64, 16.0, 16000


def _world_clips(tmp_path, count: int) -> list[tuple[AVClip, dict]]:
    """``count`` bouncing-ball shots at 64x64 through H.264 and back, as training data is."""
    out, seed = [], 0
    while len(out) < count:
        seed += 1
        try:
            clip, truth = render_shot("bouncing_balls", seed, 17 / FPS, SIZE, SIZE, FPS, RATE)
        except SceneError:
            continue
        uri = str(tmp_path / f"shot{seed}.mp4")
        write_mp4(uri, clip, crf=16, aac_coder="fast")
        out.append((read_clip(uri), truth))
    return out


def test_min_object_area_scales_with_small_frames():
    assert [min_object_area(s) for s in (32, 64, 96, 128, 720)] == [12, 12, 18, 24, 24]


@pytest.fixture(scope="module")
def world_clips(tmp_path_factory):
    return _world_clips(tmp_path_factory.mktemp("rater"), 16)


def test_adherence_sees_the_worlds_own_small_balls(world_clips):
    """Recall: every clip scores 1 on its own caption (colours and counts); the default
    24-pixel minimum scored these clips 0.94 on average (balls of 16-23 pixels)."""
    scores = [rate_clip(truth["caption"], clip)["adherence"] for clip, truth in world_clips]
    print("adherence on own captions:", [round(s, 2) for s in scores])
    assert min(scores) == 1.0


def test_adherence_is_zero_for_absent_colours_and_an_empty_floor(world_clips):
    """Precision: a caption naming a colour that is not in the clip scores 0, and a bare
    backdrop (with encoder-like noise) shows no object at all."""
    for clip, truth in world_clips:
        present = {o["color"] for o in truth["objects"]}
        absent = next(c for c in COLOR_NAMES if c not in present)
        assert rate_clip(f"a {absent} circle bounces", clip)["adherence"] == 0.0
    rng = np.random.default_rng(0)
    for tone in background_prototypes():
        frames = np.clip(tone + rng.normal(0, 3, (17, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        empty = AVClip(frames=frames, fps=FPS, audio=np.zeros((2, 17000), np.float32),
                       sample_rate=RATE)  # fmt: skip
        scores = rate_clip("a red circle bounces", empty)
        assert scores["adherence"] == 0.0 and scores["motion"] == 0.0
