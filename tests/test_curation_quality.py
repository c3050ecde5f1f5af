"""Quality scores and verdicts, near-duplicates, and the Parquet manifest."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from curation.manifest import (
    SCHEMA_VERSION,
    ManifestError,
    assign_split,
    clips_table,
    manifest_uris,
    read_clips,
    split_key,
    write_manifest,
)
from curation.quality import QualityConfig, QualityStage, mark_near_duplicates, perceptual_hash
from curation.records import ClipRecord, QuarantineRecord, ShotRecord, clip_id_of

RATE = 48000


def _record(
    shot: int = 0, start: float = 0.0, source: str = "/raw/a.mp4", w=320, h=192
) -> ClipRecord:
    return ClipRecord(
        clip_id=clip_id_of(source, start, start + 2.0),
        source_uri=source,
        source_id=source[-5],
        shot_index=shot,
        clip_index=0,
        start_frame=int(start * 24),
        end_frame=int(start * 24) + 48,
        start_s=start,
        end_s=start + 2.0,
        fps=24.0,
        width=w,
        height=h,
        sample_rate=RATE,
    )


def _moving_luma(seed: int = 0, t: int = 48) -> np.ndarray:
    """A bright disc moving over a textured backdrop: (T, 96, 160)."""
    rng = np.random.default_rng(seed)
    backdrop = rng.uniform(40, 160, size=(96, 160)).astype(np.float32)
    backdrop = np.repeat(np.repeat(backdrop[::8, ::8], 8, 0), 8, 1)
    yy, xx = np.mgrid[0:96, 0:160]
    frames = np.repeat(backdrop[None], t, 0)
    for i in range(t):
        frames[i][(yy - 48) ** 2 + (xx - 10 - 3 * i) ** 2 < 64] = 240
    return frames


def _tone(seconds: float = 2.0, amp: float = 0.2) -> np.ndarray:
    n = int(seconds * RATE)
    return (
        (amp * np.sin(2 * np.pi * 300 * np.arange(n) / RATE)).astype(np.float32)[None].repeat(2, 0)
    )


def test_good_clip_passes_every_filter():
    clip = QualityStage()(_record(), _moving_luma(), _tone(), RATE)
    assert all(clip.verdicts.values()), clip.verdicts
    assert clip.scores["motion"] > 0.5 and clip.scores["black_ratio"] == 0.0
    assert -20 < clip.scores["loudness_dbfs"] < -10  # a 0.2-amplitude sine: -17 dBFS
    assert len(clip.phash) == 48  # 192 bits as hex


@pytest.mark.parametrize(
    "name, luma, audio, verdict",
    [
        ("black", np.full((48, 96, 160), 5.0, np.float32), _tone(), "not_black"),
        ("frozen", np.repeat(_moving_luma()[:1], 48, 0), _tone(), "not_frozen"),
        ("static", np.repeat(_moving_luma()[:1], 48, 0), _tone(), "has_motion"),
        ("silent", _moving_luma(), np.zeros((2, 2 * RATE), np.float32), "not_silent"),
        ("quiet", _moving_luma(), _tone(amp=1e-4), "loud_enough"),
    ],
)
def test_each_filter_rejects_its_defect(name, luma, audio, verdict):
    clip = QualityStage()(_record(), luma, audio, RATE)
    assert clip.verdicts[verdict] is False, (name, clip.scores)
    assert not clip.keep


def test_resolution_and_aspect_filters():
    stage = QualityStage(QualityConfig(min_side_px=128))
    small = stage(_record(w=160, h=96), _moving_luma(), _tone(), RATE)
    assert small.verdicts["resolution_ok"] is False
    wide = stage(_record(w=1280, h=256), _moving_luma(), _tone(), RATE)
    assert wide.verdicts["aspect_ok"] is False and wide.scores["aspect"] == 5.0


def test_near_duplicates_across_shots_but_not_within_one():
    luma = _moving_luma(seed=1)
    a = QualityStage()(_record(shot=0, start=0.0), luma, _tone(), RATE)
    same_shot = QualityStage()(_record(shot=0, start=2.0), luma + 1.0, _tone(), RATE)
    other_video = QualityStage()(
        _record(shot=0, start=0.0, source="/raw/b.mp4"), luma + 2.0, _tone(), RATE
    )
    different = QualityStage()(_record(shot=1, start=4.0), _moving_luma(seed=7), _tone(), RATE)
    mark_near_duplicates([other_video, different, same_shot, a], max_bits=8)
    assert a.verdicts["not_duplicate"] and same_shot.verdicts["not_duplicate"]
    assert other_video.verdicts["not_duplicate"] is False and other_video.duplicate_of == a.clip_id
    assert different.verdicts["not_duplicate"]
    assert perceptual_hash(luma) == perceptual_hash(luma + 1.0)


def test_manifest_round_trip_with_polars(tmp_path):
    clips = []
    for i, source in enumerate(["/raw/b.mp4", "/raw/a.mp4"]):
        clip = QualityStage()(_record(source=source), _moving_luma(seed=i), _tone(), RATE)
        clip.caption = f"caption {i}"
        clip.words = [{"word": "hello", "start_s": 0.1, "end_s": 0.4, "score": 0.9}]
        clip.transcript, clip.alignment_method = "hello", "wav2vec2"
        clip.split = assign_split(split_key(clip.source_uri), 0.1, 0.0)
        clips.append(clip)
    mark_near_duplicates(clips, 8)
    quarantine = [QuarantineRecord("/raw/bad.mp4", "q", "validate", "file is empty (0 bytes)", 0)]
    shots = [ShotRecord("a", 0, 0, 48, 0.0, 2.0, "start")]
    out = str(tmp_path)
    uris = write_manifest(out, clips, quarantine, shots, run_config={"k": 1})
    df = pl.read_parquet(uris["clips"])
    assert df["source_uri"].to_list() == ["/raw/a.mp4", "/raw/b.mp4"]  # sorted
    assert (df["schema_version"] == SCHEMA_VERSION).all()
    assert df["words"][0][0]["word"] == "hello" and df["alignment_method"][0] == "wav2vec2"
    assert df["keep"].to_list() == [c.keep for c in sorted(clips, key=lambda c: c.source_uri)]
    assert pl.read_parquet(uris["quarantine"])["reason"][0] == "file is empty (0 bytes)"
    assert read_clips(out).num_rows == 2
    meta = pq.read_schema(manifest_uris(out)["clips"]).metadata
    assert meta[b"duet.schema_version"] == str(SCHEMA_VERSION).encode()


def test_manifest_rejects_bad_versions_and_duplicates(tmp_path):
    clip = QualityStage()(_record(), _moving_luma(), _tone(), RATE)
    mark_near_duplicates([clip], 8)
    with pytest.raises(ManifestError, match="duplicate clip ids"):
        clips_table([clip, dataclasses.replace(clip)])
    bad = dataclasses.replace(clip, scores={**clip.scores, "invented": 1.0})
    with pytest.raises(ManifestError, match="not in the schema"):
        clips_table([bad])
    table = clips_table([clip]).replace_schema_metadata({b"duet.schema_version": b"999"})
    uri = manifest_uris(str(tmp_path))["clips"]
    import os

    os.makedirs(os.path.dirname(uri))
    pq.write_table(table, uri)
    with pytest.raises(ManifestError, match="schema_version"):
        read_clips(str(tmp_path))


def test_clip_ids_are_stable_and_distinct():
    assert clip_id_of("/a.mp4", 1.0, 3.0) == clip_id_of("/a.mp4", 1.0, 3.0)
    assert clip_id_of("/a.mp4", 1.0, 3.0) != clip_id_of("/a.mp4", 1.0, 3.5)
    assert clip_id_of("/a.mp4", 1.0, 3.0) != clip_id_of("/b.mp4", 1.0, 3.0)


def test_short_stills_are_not_frozen_but_long_ones_are():
    moving = _moving_luma(t=48)
    # Half a second of stillness between two moving stretches: a pause, not a defect.
    paused = np.concatenate([moving[:12], np.repeat(moving[12:13], 12, 0), moving[24:]])
    clip = QualityStage()(_record(), paused, _tone(), RATE)
    assert clip.scores["frozen_ratio"] == 0.0 and clip.verdicts["not_frozen"]
    # 1.5 s of one repeated frame in a 2 s clip: frozen.
    stuck = np.concatenate([moving[:12], np.repeat(moving[12:13], 36, 0)])
    clip = QualityStage()(_record(), stuck, _tone(), RATE)
    assert clip.scores["frozen_ratio"] > 0.5 and not clip.verdicts["not_frozen"]


def test_a_source_keeps_its_split_wherever_it_is_stored():
    """The split is drawn from the file name: a copy in another folder or bucket (or the
    same footage in another checkout) trains and validates the same way."""
    names = [f"synth_{i:05d}.mp4" for i in range(40)]
    here = [assign_split(split_key(f"/home/me/raw/{n}"), 0.2, 0.1) for n in names]
    there = [assign_split(split_key(f"s3://bucket/footage/{n}"), 0.2, 0.1) for n in names]
    assert here == there
    assert {"train", "val", "test"} == set(here)  # the fractions still act
    assert split_key("s3://b/raw/a%20b.mp4") == "a%20b.mp4" and split_key("a.mp4") == "a.mp4"
