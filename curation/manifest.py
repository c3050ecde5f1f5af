"""The curation manifest: versioned Parquet tables written with pyarrow.

``OUT/manifest/clips.parquet``: one row per clip (stable id, source, times, URI,
every score and verdict, ``keep``, captions, transcript with word times, sync
offset, split). ``quarantine.parquet``: one row per rejected source with the
reason. ``shots.parquet``: every detected shot. Each table carries a
``schema_version`` column and the same value in the file's metadata; readers
check it (:func:`read_clips`). Polars reads the files directly.

Rows are sorted by (source, start time), so two runs over the same inputs write
equal tables whatever order the parallel work finished in.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from curation.records import ClipRecord, QuarantineRecord, ShotRecord

SCHEMA_VERSION = 1

SCORE_NAMES = (
    "black_ratio",
    "frozen_ratio",
    "motion",
    "mean_luma",
    "loudness_dbfs",
    "peak_dbfs",
    "silence_ratio",
    "width",
    "height",
    "aspect",
    "sync_offset_ms",
    "sync_confidence",
    "duplicate_distance_bits",
)
VERDICT_NAMES = (
    "not_black",
    "not_frozen",
    "has_motion",
    "loud_enough",
    "not_silent",
    "resolution_ok",
    "aspect_ok",
    "av_sync_ok",
    "not_duplicate",
)

WORD_TYPE = pa.struct(
    [
        ("word", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("score", pa.float64()),
    ]
)

CLIP_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("clip_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_id", pa.string()),
        ("shot_index", pa.int32()),
        ("clip_index", pa.int32()),
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sample_rate", pa.int32()),
        ("clip_uri", pa.string()),
        *[(f"score_{name}", pa.float64()) for name in SCORE_NAMES],
        *[(f"verdict_{name}", pa.bool_()) for name in VERDICT_NAMES],
        ("keep", pa.bool_()),
        ("phash", pa.string()),
        ("duplicate_of", pa.string()),
        ("caption", pa.string()),
        ("caption_backend", pa.string()),
        ("caption_model", pa.string()),
        ("transcript", pa.string()),
        ("words", pa.list_(WORD_TYPE)),
        ("language", pa.string()),
        ("alignment_method", pa.string()),
        ("speech_model", pa.string()),
        ("sync_offset_ms", pa.float64()),
        ("sync_confidence", pa.float64()),
        ("sync_verdict", pa.string()),
        ("sync_method", pa.string()),
        ("sync_corrected", pa.bool_()),
        ("split", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("uri", pa.string()),
        ("source_id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("size_bytes", pa.int64()),
    ]
)

SHOT_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("source_id", pa.string()),
        ("index", pa.int32()),
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("transition_in", pa.string()),
    ]
)


class ManifestError(ValueError):
    """A manifest file is missing, of another schema version, or malformed."""


def assign_split(source_id: str, val_fraction: float, test_fraction: float) -> str:
    """Split by source (never by clip), so clips of one video never straddle splits."""
    bucket = int(hashlib.sha1(source_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def clip_row(clip: ClipRecord) -> dict[str, Any]:
    unknown = set(clip.scores) - set(SCORE_NAMES)
    if unknown:
        raise ManifestError(f"clip {clip.clip_id}: scores {sorted(unknown)} are not in the schema")
    unknown = set(clip.verdicts) - set(VERDICT_NAMES)
    if unknown:
        raise ManifestError(
            f"clip {clip.clip_id}: verdicts {sorted(unknown)} are not in the schema"
        )
    row: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "clip_id": clip.clip_id,
        "source_uri": clip.source_uri,
        "source_id": clip.source_id,
        "shot_index": clip.shot_index,
        "clip_index": clip.clip_index,
        "start_frame": clip.start_frame,
        "end_frame": clip.end_frame,
        "start_s": clip.start_s,
        "end_s": clip.end_s,
        "duration_s": clip.duration_s,
        "fps": clip.fps,
        "width": clip.width,
        "height": clip.height,
        "sample_rate": clip.sample_rate,
        "clip_uri": clip.uri,
        "keep": clip.keep,
        "phash": clip.phash,
        "duplicate_of": clip.duplicate_of,
        "caption": clip.caption,
        "caption_backend": clip.caption_backend,
        "caption_model": clip.caption_model,
        "transcript": clip.transcript,
        "words": [
            {
                "word": str(w.get("word", "")),
                "start_s": _float_or_none(w.get("start_s", w.get("start"))),
                "end_s": _float_or_none(w.get("end_s", w.get("end"))),
                "score": _float_or_none(w.get("score")),
            }
            for w in clip.words
        ],
        "language": clip.language,
        "alignment_method": clip.alignment_method,
        "speech_model": clip.speech_model,
        "sync_offset_ms": clip.sync_offset_ms,
        "sync_confidence": clip.sync_confidence,
        "sync_verdict": clip.sync_verdict,
        "sync_method": clip.sync_method,
        "sync_corrected": clip.sync_corrected,
        "split": clip.split,
    }
    for name in SCORE_NAMES:
        row[f"score_{name}"] = clip.scores.get(name)
    for name in VERDICT_NAMES:
        row[f"verdict_{name}"] = clip.verdicts.get(name)
    return row


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def clips_table(clips: list[ClipRecord]) -> pa.Table:
    ordered = sorted(clips, key=lambda c: (c.source_uri, c.start_s, c.clip_id))
    ids = [c.clip_id for c in ordered]
    if len(set(ids)) != len(ids):
        raise ManifestError("duplicate clip ids in the manifest")
    return pa.Table.from_pylist([clip_row(c) for c in ordered], schema=CLIP_SCHEMA)


def quarantine_table(records: list[QuarantineRecord]) -> pa.Table:
    ordered = sorted(records, key=lambda q: (q.uri, q.source_id))
    rows = [{"schema_version": SCHEMA_VERSION, **q.to_dict()} for q in ordered]
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def shots_table(shots: list[ShotRecord]) -> pa.Table:
    ordered = sorted(shots, key=lambda s: (s.source_id, s.index))
    rows = [{"schema_version": SCHEMA_VERSION, **s.to_dict()} for s in ordered]
    return pa.Table.from_pylist(rows, schema=SHOT_SCHEMA)


def _write(table: pa.Table, uri: str, run_config: dict[str, Any] | None) -> None:
    metadata = dict(table.schema.metadata or {})
    metadata[b"duet.schema_version"] = str(SCHEMA_VERSION).encode()
    if run_config is not None:
        metadata[b"duet.run_config"] = json.dumps(run_config, sort_keys=True).encode()
    table = table.replace_schema_metadata(metadata)
    with storage.local_output(uri) as path:
        pq.write_table(table, path)


def manifest_uris(out_uri: str) -> dict[str, str]:
    base = storage.join(out_uri, "manifest")
    return {
        "clips": storage.join(base, "clips.parquet"),
        "quarantine": storage.join(base, "quarantine.parquet"),
        "shots": storage.join(base, "shots.parquet"),
    }


def write_manifest(
    out_uri: str,
    clips: list[ClipRecord],
    quarantine: list[QuarantineRecord],
    shots: list[ShotRecord],
    run_config: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write the three tables atomically (each file appears whole or not at all)."""
    uris = manifest_uris(out_uri)
    _write(shots_table(shots), uris["shots"], run_config)
    _write(quarantine_table(quarantine), uris["quarantine"], run_config)
    # The clips table last: its presence means the manifest is complete.
    _write(clips_table(clips), uris["clips"], run_config)
    return uris


def read_table(uri: str) -> pa.Table:
    """A manifest table, checked to be of this code's schema version."""
    try:
        with storage.local_copy(uri) as path:
            table = pq.read_table(path)
    except storage.StorageError as err:
        raise ManifestError(f"{uri}: no manifest table") from err
    version = (table.schema.metadata or {}).get(b"duet.schema_version")
    if version is None or int(version) != SCHEMA_VERSION:
        raise ManifestError(
            f"{uri}: schema_version {version!r}, this code reads version {SCHEMA_VERSION}"
        )
    return table


def read_clips(out_uri: str) -> pa.Table:
    return read_table(manifest_uris(out_uri)["clips"])
