"""Shot detection against the synthetic world's ground truth, and shot -> clip cutting."""

from __future__ import annotations

import numpy as np
import pytest

from core import storage
from core.synth import SynthConfig, generate_corpus
from curation.clips import ClipConfig, clip_spans
from curation.records import ShotRecord
from curation.segment import analysis_frames
from curation.shots import ShotConfig, ShotStage, merge_boundaries
from curation.validate import ValidateStage


@pytest.fixture(scope="module")
def decoded_corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shots_corpus"))
    # Short shots and frequent fades: many boundaries per second of footage.
    config = SynthConfig(
        min_shots=4, max_shots=6, min_shot_s=2.5, max_shot_s=3.5, fade_probability=0.5
    )
    uris = generate_corpus(root, 4, seed=5, config=config)
    out = []
    for uri in uris:
        source = ValidateStage()(uri)
        bgr, _ = analysis_frames(uri, source)
        sidecar = storage.read_json(uri[:-4] + ".json")
        out.append((Analysed(source.source_id, bgr, source.fps), sidecar))
    return out


class Analysed:
    def __init__(self, source_id: str, bgr: np.ndarray, fps: float):
        self.source_id, self.bgr, self.fps = source_id, bgr, fps
        self.num_frames = bgr.shape[0]


def shots_of(stage: ShotStage, analysed: Analysed) -> list[ShotRecord]:
    return stage(analysed.bgr, analysed.fps, analysed.source_id)


def boundary_f1(decoded_corpus, stage: ShotStage) -> tuple[float, int, int, int, int]:
    """F1 of detected boundaries: a cut must be within 1 frame of the truth, a fade
    within its half-duration (+1 frame) of the fade's centre."""
    tp = fp = fn = fades_found = 0
    for decoded, sidecar in decoded_corpus:
        fps = sidecar["fps"]
        truth = []
        for t in sidecar["transitions"]:
            tol = 1 if t["type"] == "cut" else t["duration_s"] * fps / 2 + 1
            truth.append((t["time_s"] * fps, tol, t["type"]))
        shots = shots_of(stage, decoded)
        found = [s.start_frame for s in shots[1:]]
        used: set[int] = set()
        for frame in found:
            match = [
                i for i, (g, tol, _) in enumerate(truth) if abs(g - frame) <= tol and i not in used
            ]
            if match:
                tp += 1
                used.add(match[0])
                fades_found += truth[match[0]][2] == "fade"
            else:
                fp += 1
        fn += len(truth) - len(used)
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    return f1, tp, fp, fn, fades_found


def test_shot_boundary_f1_on_synthetic_world(decoded_corpus):
    f1, tp, fp, fn, fades = boundary_f1(decoded_corpus, ShotStage())
    total_fades = sum(
        t["type"] == "fade" for _, sidecar in decoded_corpus for t in sidecar["transitions"]
    )
    print(f"shot boundary F1={f1:.3f} tp={tp} fp={fp} fn={fn} fades={fades}/{total_fades}")
    assert tp >= 12
    assert f1 >= 0.95
    assert total_fades > 0 and fades == total_fades


def test_detected_transition_kinds(decoded_corpus):
    decoded, sidecar = decoded_corpus[0]
    shots = shots_of(ShotStage(), decoded)
    assert shots[0].transition_in == "start" and shots[0].start_frame == 0
    assert shots[-1].end_frame == decoded.num_frames
    for a, b in zip(shots, shots[1:], strict=False):
        assert a.end_frame == b.start_frame  # every frame in exactly one shot
    truth_kinds = [t["type"] for t in sidecar["transitions"]]
    assert [s.transition_in for s in shots[1:]] == truth_kinds


def test_content_detector_and_thresholds_are_configurable(decoded_corpus):
    f1, *_ = boundary_f1(decoded_corpus, ShotStage(ShotConfig(cut_detector="content")))
    assert f1 >= 0.9
    # A minimum shot length longer than any shot suppresses every boundary.
    decoded, _ = decoded_corpus[0]
    assert len(shots_of(ShotStage(ShotConfig(min_shot_s=60.0)), decoded)) == 1
    with pytest.raises(ValueError):
        ShotConfig(cut_detector="magic")


def test_merge_prefers_fade_over_nearby_cut():
    merged = merge_boundaries(cuts=[100, 300], fades=[103], min_len=10, num_frames=400)
    assert merged == [(103, "fade"), (300, "cut")]


def _shot(start: int, end: int, kind: str = "cut") -> ShotRecord:
    return ShotRecord("s", 1, start, end, start / 24, end / 24, kind)


def test_clip_spans_lengths_and_trims():
    cfg = ClipConfig(min_clip_s=2.0, max_clip_s=5.0, trim_s=0.125)
    spans = clip_spans(_shot(0, 24 * 12), 24.0, cfg, ends_on_transition=True)
    # 12 s minus 3 + 3 trimmed frames -> 3 equal pieces of at most 5 s.
    assert len(spans) == 3
    assert spans[0][0] == 3 and spans[-1][1] <= 24 * 12 - 3
    for a, b in spans:
        assert 2.0 <= (b - a) / 24 <= 5.0
    assert clip_spans(_shot(0, 40), 24.0, cfg) == []  # shorter than min_clip_s
    # Fade tails (dark frames) are trimmed off the content.
    luma = np.full(24 * 6, 100.0)
    luma[:10] = np.linspace(0, 90, 10)
    spans = clip_spans(_shot(0, 24 * 6, "fade"), 24.0, cfg, luma, ends_on_transition=False)
    assert spans[0][0] >= 8
