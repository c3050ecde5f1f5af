"""The tiny model overfits a handful of synthetic-world clips on a CPU.

Both VAEs and the DiT are trained from scratch by :func:`model.fit.fit_pipeline` on
three one-ball ``bouncing_balls`` shots (64x64, 16 fps, 16 kHz). Then each caption
is generated and the result is measured with the synthetic world's own probes:

- the probed object colour must be the prompt's colour;
- the audio onsets must fall within 2 frames of the impacts: the impacts the probe
  sees in the generated video, and the ground-truth impacts of the clip the prompt
  describes.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from core.probes import probe_clip
from core.synth import render_shot
from model.fit import FitSettings, fit_pipeline
from model.generate import GenerationRequest, generate
from model.pipeline import DuetPipeline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

FPS, SR, SIZE = 16.0, 16000, 64
DURATION_S = 33 / FPS  # 1 + 4 * 8 frames
FRAME_S = 1.0 / FPS


def _training_clips(count: int = 3, min_radius_px: float = 4.0):
    """One-ball shots of distinct colours whose impacts the probe sees in the source.

    Picking by measurement (not by hard-coded seeds) keeps the test meaningful if the
    synthetic world's renderer changes: a clip whose own impacts the probe cannot see
    could not tell us anything about the generated ones.
    """
    chosen, colours = [], set()
    for seed in range(400):
        clip, truth = render_shot("bouncing_balls", seed, DURATION_S, SIZE, SIZE, FPS, SR)
        objects = truth["objects"]
        if (
            len(objects) != 1
            or objects[0]["color"] in colours
            or objects[0]["radius_px"] < min_radius_px
        ):
            continue
        probe = probe_clip(clip, include_frames=False)
        seen = [o["color"] for shot in probe["shots"] for o in shot["objects"]]
        impacts = [e["time_s"] for e in truth["events"]]
        visual = [e["time_s"] for e in probe["visual_events"]]
        hits = sum(any(abs(a - b) <= FRAME_S for b in visual) for a in impacts)
        if seen != [objects[0]["color"]] or hits < 2 or len(visual) > len(impacts):
            continue
        chosen.append((clip, truth))
        colours.add(objects[0]["color"])
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"the synthetic world gave fewer than {count} usable one-ball clips")


def _nearest_errors(targets, candidates):
    return [min((abs(t - c) for c in candidates), default=float("inf")) for t in targets]


def test_overfit_tiny_colour_and_sync():
    started = time.perf_counter()
    torch.manual_seed(0)
    data = _training_clips()
    clips = [clip for clip, _ in data]
    captions = [truth["caption"] for _, truth in data]
    pipe = DuetPipeline.from_preset("tiny", seed=0)
    report = fit_pipeline(pipe, clips, captions, FitSettings(), log=print)
    fit_s = time.perf_counter() - started
    for name in ("video_vae", "audio_vae", "dit"):
        first, last = report.first_last(name)
        print(f"{name}: loss {first:.4f} -> {last:.4f} in {report.seconds[name]:.1f} s")
        assert last < 0.5 * first, (name, first, last)

    colour_ok, wrong_colours = 0, []
    visual_vs_onset, truth_vs_onset = [], []
    for (_, truth), caption in zip(data, captions, strict=True):
        wanted = truth["objects"][0]["color"]
        out = generate(
            GenerationRequest(
                prompt=caption,
                duration_s=DURATION_S,
                seed=1,
                steps=20,
                sampler="heun",
                text_scale=3.0,
            ),
            pipeline=pipe,
        )
        probe = probe_clip(out.clip, include_frames=False)
        seen = {o["color"] for shot in probe["shots"] for o in shot["objects"]}
        visual = [e["time_s"] for e in probe["visual_events"]]
        onsets = [float(t) for t in probe["audio_onsets_s"]]
        impacts = [e["time_s"] for e in truth["events"]]
        colour_ok += seen == {wanted}
        wrong_colours += sorted(seen - {wanted})
        visual_vs_onset += _nearest_errors(visual, onsets)
        truth_vs_onset += _nearest_errors(impacts, onsets)
        print(
            f"{caption!r}: probed colours {sorted(seen)}, visual impacts {np.round(visual, 3).tolist()}, "
            f"audio onsets {np.round(onsets, 3).tolist()}, true impacts {np.round(impacts, 3).tolist()}"
        )
    total_s = time.perf_counter() - started
    print(
        f"colour matches {colour_ok}/{len(data)}, wrong colours {wrong_colours}; "
        f"|visual impact - onset| (frames) {np.round(np.array(visual_vs_onset) / FRAME_S, 2).tolist()}; "
        f"|true impact - onset| (frames) {np.round(np.array(truth_vs_onset) / FRAME_S, 2).tolist()}; "
        f"fit {fit_s:.0f} s, total {total_s:.0f} s"
    )
    assert colour_ok >= len(data) - 1 and not wrong_colours
    assert len(visual_vs_onset) >= 2, "the probe saw too few impacts in the generated videos"
    assert statistics.median(visual_vs_onset) <= 2 * FRAME_S
    within = sum(e <= 2 * FRAME_S for e in truth_vs_onset) / len(truth_vs_onset)
    assert within >= 2 / 3, truth_vs_onset
