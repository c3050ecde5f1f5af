"""Does a video VAE keep the objects? Probe its reconstructions of a corpus's clips.

    python -m bench.vae_objects --manifest CORPUS/clips.parquet --checkpoints RUN/vae/final ...

For each clip of a one-colour manifest (``pipelines.train.conditioning.build_corpus``:
its ``colour`` column is the truth) and each checkpoint: encode and decode the clip,
then ask the probes whether the clip's colour is there (the median frame holds an
object of that colour) and score the reconstruction against the clip's caption with
the alignment rater's adherence (colour and count IoU; colourless captions are
skipped). Printed per checkpoint: the colour found in how many clips, per colour, and
mean adherence of the reconstructions next to the originals'. A generator trained in
a VAE's latent space cannot draw what the VAE loses, so this bounds every later stage.
"""

from __future__ import annotations

import argparse
import collections
import statistics


def _colour_found(frames_dets: list[list[dict]], colour: str) -> bool:
    per_frame = sorted(sum(d["color"] == colour for d in dets) for dets in frames_dets)
    return per_frame[len(per_frame) // 2] >= 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="clips.parquet with a colour column")
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch

    from core import storage
    from core.media import read_clip
    from core.probes.captions import parse_caption
    from core.probes.detect import detect_objects, min_object_area
    from model.pipeline import DuetPipeline
    from pipelines.align.rater import adherence_score

    if args.threads:
        torch.set_num_threads(args.threads)
    with storage.local_copy(args.manifest) as path:
        rows = pq.read_table(path).to_pylist()
    if not rows or "colour" not in rows[0]:
        raise SystemExit(f"{args.manifest}: no rows with a 'colour' column")
    clips = [read_clip(r["clip_uri"]) for r in rows]

    def measure(frames) -> list[list[dict]]:
        area = min_object_area(min(frames.shape[1:3]))
        return [detect_objects(f, area) for f in frames]

    def report(name: str, frames_of) -> None:
        found, adherence = collections.defaultdict(list), []
        for row, clip in zip(rows, clips, strict=True):
            frames = frames_of(clip)
            dets = measure(frames)
            found[row["colour"]].append(_colour_found(dets, row["colour"]))
            if parse_caption(row["caption"]):
                adherence.append(adherence_score(row["caption"], dets, min(frames.shape[1:3])))
        cells = ", ".join(f"{c} {sum(v)}/{len(v)}" for c, v in sorted(found.items()))
        mean = statistics.fmean(adherence) if adherence else float("nan")
        print(f"{name}: colour found {cells}; adherence {mean:.3f} over {len(adherence)} captions")

    report("originals", lambda clip: clip.frames)
    for uri in args.checkpoints:
        pipe = DuetPipeline.from_checkpoint(uri)

        def reconstruct(clip, pipe=pipe):
            tf = pipe.config.video_vae.temporal_factor
            n = 1 + tf * ((clip.frames.shape[0] - 1) // tf)
            video, audio = pipe.encode_clip(clip, n)
            return pipe.decode_latents(video, audio, n).frames

        report(uri, reconstruct)


if __name__ == "__main__":
    main()
