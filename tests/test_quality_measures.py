"""Issue 21's quality measures (pipelines.shipped.conditioning_quality) score the
ground truth core.synth renders as meeting the recipe's targets, and a clip that
does not follow its conditioning as missing them. Nothing is trained: the
'generations' are the rendered truth and deliberately wrong clips."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.media import AVClip
from pipelines.shipped import conditioning_quality as cq
from pipelines.train.reference_pairs import Geometry, render_reference

ROOT = Path(__file__).resolve().parents[1]
TARGETS = tomllib.loads((ROOT / "recipes/conditioning-cpu.toml").read_text())["targets"]
G = Geometry(64, 64, 16.0, 16000, 33)  # 2 s at 16 fps, 1 + 4k frames
CASES = 2


def met(kind: str, clips: list[AVClip], cases: list[cq.Case]) -> dict[str, bool]:
    """{target label: met} of ``clips`` scored as the generations of ``cases``."""
    rows = [cq.score_case(case, clip) for case, clip in zip(cases, clips, strict=True)]
    result = {kind: cq.summarise(kind, rows)}
    return {r["target"]: r["met"] for r in cq.target_rows(result, TARGETS)}


def frames_as(clip: AVClip, frames: np.ndarray) -> AVClip:
    return replace(clip, frames=np.ascontiguousarray(frames))


def still(clip: AVClip) -> AVClip:
    return frames_as(clip, np.repeat(clip.frames[:1], clip.num_frames, axis=0))


def late(clip: AVClip, frames: int = 3) -> AVClip:
    """Picture three frames late (the first frame held)."""
    f = clip.frames
    return frames_as(clip, np.concatenate([np.repeat(f[:1], frames, 0), f[:-frames]]))


def test_every_target_of_the_recipe_is_measured():
    keys = {key for _, key, _, _ in cq.TARGETS}
    assert keys <= set(TARGETS), keys - set(TARGETS)
    assert {kind for kind, *_ in cq.TARGETS} == set(cq.KINDS) == set(cq.BUILDERS)


def test_image_reference_subject():
    cases = cq.image_cases(G, CASES)
    assert all(not c.prompt.split("@")[0].count(c.expected["colour"]) for c in cases)
    assert all(met("image", [c.truth for c in cases], cases).values())
    # Another subject: each case gets the other case's target.
    assert cases[0].expected["colour"] != cases[1].expected["colour"]
    wrong = [cases[1 - i].truth for i in range(len(cases))]
    assert not any(cq.score_case(c, w)["passed"] for c, w in zip(cases, wrong, strict=True))
    assert not any(met("image", wrong, cases).values())
    # The motion reference's render: other colours and shapes.
    wrong = [render_reference("video", c.expected["seed"], G).clip for c in cases]
    assert not any(met("image", wrong, cases).values())


def test_video_reference_motion():
    cases = cq.video_cases(G, CASES)
    assert all(met("video", [c.truth for c in cases], cases).values())
    assert not any(met("video", [still(c.truth) for c in cases], cases).values())
    reversed_ = [frames_as(c.truth, c.truth.frames[::-1]) for c in cases]
    assert not any(met("video", reversed_, cases).values())


def test_audio_reference_tempo():
    g = replace(G, frames=49)
    cases = cq.audio_cases(g, CASES)
    assert all(met("audio", [c.truth for c in cases], cases).values())
    # The same beat clips at another tempo: each case gets the other's audio, or a
    # beat 10% slower where the two tempos are within 5%.
    wrong = []
    for i, c in enumerate(cases):
        other = cases[1 - i].truth
        if abs(cases[1 - i].expected["bpm"] / c.expected["bpm"] - 1) <= 0.05:
            n = other.audio.shape[1]
            idx = np.minimum((np.arange(int(n * 1.1)) / 1.1).astype(int), n - 1)
            other = replace(other, audio=other.audio[:, idx])
        wrong.append(other)
    assert not any(met("audio", wrong, cases).values())


def test_v2a_onsets_against_impacts():
    cases = cq.v2a_cases(G, CASES)
    assert all(met("v2a", [c.truth for c in cases], cases).values())
    shift = int(0.2 * G.sample_rate)  # sound 200 ms (over 3 frames) late
    wrong = [replace(c.truth, audio=np.roll(c.truth.audio, shift, axis=1)) for c in cases]
    assert not any(met("v2a", wrong, cases).values())


def test_a2v_pulses_on_the_beats():
    cases = cq.a2v_cases(G, CASES)
    assert all(met("a2v", [c.truth for c in cases], cases).values())
    assert not any(met("a2v", [late(c.truth) for c in cases], cases).values())


def test_multishot_subject_and_cuts():
    cases = cq.multishot_cases(G, CASES)
    assert all(len(c.expected["boundaries_s"]) == 3 for c in cases)
    assert all(met("multishot", [c.truth for c in cases], cases).values())
    # Cuts three frames off the plan: the subject is still there, the cuts are not.
    got = met("multishot", [late(c.truth) for c in cases], cases)
    assert got == {
        "multi-shot: subject in every shot": True,
        "multi-shot: cuts within 1 frame": False,
    }
    # The last shot shows another subject: each case gets the other case's last shot.
    cut = int(round(cases[0].expected["boundaries_s"][-1] * G.fps))
    swapped = [
        frames_as(c.truth, np.concatenate([c.truth.frames[:cut], cases[1 - i].truth.frames[cut:]]))
        for i, c in enumerate(cases)
    ]
    assert cases[0].expected["subject"] != cases[1].expected["subject"]
    got = met("multishot", swapped, cases)
    assert got == {
        "multi-shot: subject in every shot": False,
        "multi-shot: cuts within 1 frame": True,
    }


def test_v2v_keeps_the_trajectory():
    cases = cq.v2v_cases(G, CASES)
    assert {c.expected["edit"] for c in cases} == {"night", "colour"}
    assert all(met("v2v", [c.truth for c in cases], cases).values())
    assert not any(met("v2v", [still(c.truth) for c in cases], cases).values())


def test_unknown_kind_is_refused():
    case = cq.Case("smell", "p", cq.image_cases(G, 1)[0].truth)
    with pytest.raises(ValueError, match="unknown case kind 'smell'"):
        cq.score_case(case, case.truth)
