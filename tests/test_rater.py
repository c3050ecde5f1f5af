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


def test_colour_adherence_frame_by_frame_against_hand_computed_values():
    from pipelines.align.rater import colour_frames_score

    def det(colour: str, shape: str = "circle") -> dict:
        return {"color": colour, "shape": shape}

    prompt = "two red circles and a blue square slide and collide on a gray floor"
    frames = [
        [det("red"), det("red"), det("blue", "square")],  # IoU 3/3
        [det("red", "square"), det("blue")],  # shapes do not count: 2/3
        [],  # 0/3
        [det("red"), det("red"), det("blue"), det("green")],  # 3/4
    ]
    assert colour_frames_score(prompt, frames) == pytest.approx((1 + 2 / 3 + 0 + 3 / 4) / 4)
    assert colour_frames_score("a circle bounces on a gray floor", frames) is None
    assert colour_frames_score(prompt, []) is None


def test_the_colour_score_split_into_recall_precision_count_and_shape_binding():
    from pipelines.align.rater import frame_parts

    def det(colour: str, shape: str = "circle") -> dict:
        return {"color": colour, "shape": shape}

    prompt = "two red circles and a blue square slide and collide on a gray floor"
    frames = [
        [det("red"), det("red"), det("blue", "square")],  # all of it
        [det("red", "square"), det("blue")],  # a red lost, shapes swapped
        [],  # nothing seen
        [det("red"), det("red"), det("blue", "square"), det("green")],  # one too many
    ]
    parts = frame_parts(prompt, frames)
    assert parts["adherence_colour_frames"] == pytest.approx((1 + 2 / 3 + 0 + 3 / 4) / 4)
    assert parts["colour_frames_recall"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    # Frames that see nothing have no precision: three frames count.
    assert parts["colour_frames_precision"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert parts["count_frames"] == pytest.approx(1 / 4)
    # (red, circle) x2 + (blue, square) named: frame 2 sees (red, square), (blue, circle).
    assert parts["shape_colour_frames"] == pytest.approx((1 + 0 + 0 + 3 / 4) / 4)
    assert frame_parts(prompt, [[], []])["colour_frames_precision"] is None
    assert frame_parts("a circle bounces on a gray floor", frames) is None


def test_preference_scores_take_adherence_from_the_chosen_rater_score():
    from pipelines.align.rater import preference_scores
    from pipelines.train.config import train_config_from

    scores = {"sync": 0.5, "adherence": 0.0, "adherence_colour_frames": 0.8, "motion": 0.7,
              "visual": 0.4, "audio": 0.9, "visual_events": 2}  # fmt: skip
    assert preference_scores(scores) == {"sync": 0.5, "adherence": 0.8, "motion": 0.7,
                                         "visual": 0.4, "audio": 0.9}  # fmt: skip
    assert preference_scores(scores, "objects")["adherence"] == 0.0
    with pytest.raises(ValueError, match="adherence_score"):
        preference_scores(scores, "shapes")
    with pytest.raises(ValueError, match="adherence_score"):
        train_config_from({"rlhf": {"preferences": {"adherence_score": "shapes"}}}).rlhf.validate()
