"""How much centre error does the probes' impact rule survive on footage with known impacts?

    python -m bench.impact_rule --videos 12 --size 128 --fps 16 --factors 6,2.5 \
        --jitters 0,0.25,0.5,1

Renders ``--videos`` synthetic videos (``core.synth``, ground-truth sidecars), encodes
each to MP4 and probes it once (the palette detector's object centres per frame). Then,
for each noise-band factor of the kink rule (``core.probes.tracks.KINK_MAD_FACTOR``)
and each jitter, it moves every detected centre by Gaussian noise of that many pixels,
tracks and reads impacts as the probes do (``segment_events``) and prints, against the sidecars' impacts and collisions (within one
frame): recall, precision, and the share of the unjittered rule's impacts still found.
An observer that places objects to within so many pixels and reads impacts by the rule
finds this much of what the rater finds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import numpy as np

IMPACTS = ("impact", "collision")


def rule_impacts(probe: dict, frames: list, size: tuple[int, int]) -> list[float]:
    """Impact times (s) the probes' tracker and kink rule read from per-frame detections."""
    from core.probes.probe import TRACK_GATE_FRACTION, segments_from_transitions
    from core.probes.tracks import segment_events

    fps, gate = float(probe["fps"]), TRACK_GATE_FRACTION * min(size)
    found = []
    for segment in segments_from_transitions(probe["transitions"], probe["num_frames"]):
        _, events = segment_events(frames, segment, fps, gate)
        found.extend(e["time_s"] for e in events if e["type"] in IMPACTS)
    return sorted(found)


def matched(truth: list[float], found: list[float], tolerance: float) -> int:
    """Greedy one-to-one matches of ``found`` times to ``truth`` times within ``tolerance``."""
    free, hits = list(found), 0
    for t in truth:
        near = [u for u in free if abs(u - t) <= tolerance]
        if near:
            free.remove(min(near, key=lambda u: abs(u - t)))
            hits += 1
    return hits


def jittered(frames: list, jitter: float, rng: np.random.Generator) -> list:
    moved = copy.deepcopy(frames)
    for detections in moved:
        for d in detections:
            d["x"] += float(rng.normal(0, jitter))
            d["y"] += float(rng.normal(0, jitter))
    return moved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--size", type=int, default=128, help="frame side (pixels)")
    ap.add_argument("--fps", type=float, default=16.0)
    ap.add_argument("--factors", default="6,2.5", help="KINK_MAD_FACTOR values")
    ap.add_argument("--jitters", default="0,0.25,0.5,1", help="centre noise (pixels)")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    import core.probes.tracks as tracks
    from core.media import read_clip, write_mp4
    from core.probes import probe_clip
    from core.synth import SynthConfig, generate_video

    cfg = SynthConfig(width=args.size, height=args.size, fps=args.fps, sample_rate=16000,
                      min_shots=4, max_shots=8, min_shot_s=2.5, max_shot_s=3.5)  # fmt: skip
    videos = []
    with tempfile.TemporaryDirectory(prefix="duet-impacts-") as folder:
        for i in range(args.videos):
            clip, sidecar = generate_video(args.seed + i, cfg, name=f"v{i}")
            uri = os.path.join(folder, f"v{i}.mp4")
            write_mp4(uri, clip)
            probe = probe_clip(read_clip(uri))
            truth = sorted(e["time_s"] for s in sidecar["shots"] for e in s["events"]
                           if e["type"] in IMPACTS)  # fmt: skip
            videos.append((probe, truth))
    size = (args.size, args.size)
    default = tracks.KINK_MAD_FACTOR
    results = []
    for factor in [float(f) for f in args.factors.split(",")]:
        tracks.KINK_MAD_FACTOR = factor
        base = [rule_impacts(p, p["frames"], size) for p, _ in videos]
        for jitter in [float(j) for j in args.jitters.split(",")]:
            rng = np.random.default_rng(0)
            hit = kept = n_truth = n_found = n_base = 0
            for (probe, truth), unjittered in zip(videos, base, strict=True):
                tol = 1.0 / float(probe["fps"])
                found = rule_impacts(probe, jittered(probe["frames"], jitter, rng), size)
                hit += matched(truth, found, tol)
                kept += matched(unjittered, found, tol)
                n_truth, n_found, n_base = (n_truth + len(truth), n_found + len(found),
                                            n_base + len(unjittered))  # fmt: skip
            row = {"factor": factor, "jitter_px": jitter, "truth": n_truth, "found": n_found,
                   "recall": round(hit / max(n_truth, 1), 3),
                   "precision": round(hit / max(n_found, 1), 3),
                   "kept": round(kept / max(n_base, 1), 3)}  # fmt: skip
            results.append(row)
            print(f"factor {factor:4.1f}  jitter {jitter:4.2f} px  truth {n_truth}  found "
                  f"{n_found}  recall {row['recall']:.3f}  precision {row['precision']:.3f}  "
                  f"kept of unjittered {row['kept']:.3f}", flush=True)  # fmt: skip
    tracks.KINK_MAD_FACTOR = default
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
