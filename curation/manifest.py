"""The curation manifest: versioned Parquet tables written with pyarrow, as shards.

Each run writes a new version (layout in :mod:`core.manifest_layout`):
``clips.parquet`` (one row per clip: stable id, source, times, URI, every score
and verdict, ``keep``, captions, transcript with word times, sync offset,
split), ``quarantine.parquet`` (one row per rejected source: stage, error type,
reason), ``shots.parquet`` (every detected shot) and ``sources.parquet`` (one
row per input with its status: ``curated``, ``no_clips`` or ``quarantined``; the
three add up to the inputs). Each table carries a ``schema_version`` column and
the same value in the file's metadata; readers check it (:func:`read_table`).

:class:`ManifestWriter` streams: sources are put in groups by their sorted URIs;
a group is written as a part file as soon as all its sources are in (and every
earlier group is), so the driver holds a bounded number of results however many
sources there are. At the end the parts are concatenated, one at a time, into the
version's tables and the pointer moves. Rows are in (source URI, start time)
order, so two runs over the same inputs write equal tables whatever order the
parallel work finished in.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.manifest_layout import (
    LATEST_POINTER,
    latest_version,
    manifest_root,
    manifest_table_uri,
    version_uri,
)
from curation.quality import DuplicateIndex, mark_near_duplicates
from curation.records import ClipRecord, QuarantineRecord, ShotRecord, SourceResult

SCHEMA_VERSION = 2

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
        ("has_audio", pa.bool_()),
        ("clip_uri", pa.string()),
        ("copy_mode", pa.string()),
        *[(f"score_{name}", pa.float64()) for name in SCORE_NAMES],
        *[(f"verdict_{name}", pa.bool_()) for name in VERDICT_NAMES],
        ("keep", pa.bool_()),
        ("phash", pa.string()),
        ("duplicate_of", pa.string()),
        ("caption", pa.string()),
        ("caption_backend", pa.string()),
        ("caption_model", pa.string()),
        ("caption_verdict", pa.string()),
        ("caption_error", pa.string()),
        ("transcript", pa.string()),
        ("words", pa.list_(WORD_TYPE)),
        ("language", pa.string()),
        ("alignment_method", pa.string()),
        ("speech_model", pa.string()),
        ("speech_verdict", pa.string()),
        ("speech_error", pa.string()),
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
        ("error_type", pa.string()),
    ]
)

SOURCE_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("uri", pa.string()),
        ("source_id", pa.string()),
        ("status", pa.string()),  # "curated" | "no_clips" | "quarantined"
        ("clips", pa.int32()),
        ("clips_kept", pa.int32()),
        ("media_seconds", pa.float64()),
        ("container", pa.string()),
        ("video_codec", pa.string()),
        ("audio_codec", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("display_width", pa.int32()),
        ("display_height", pa.int32()),
        ("rotation", pa.int32()),
        ("sample_aspect_ratio", pa.float64()),
        ("fps", pa.float64()),
        ("variable_frame_rate", pa.bool_()),
        ("has_audio", pa.bool_()),
        ("audio_streams", pa.int32()),
        ("fingerprint", pa.string()),
        ("stage_failed", pa.string()),
        ("reason", pa.string()),
        ("cpu_seconds", pa.float64()),
        ("peak_rss_mb", pa.float64()),
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


def split_key(source_uri: str) -> str:
    """What a source's split is drawn from: its file name, not its folder or bucket,
    so the same footage curated from another place (a copy on S3, another checkout)
    lands in the same split."""
    return source_uri.rstrip("/").rsplit("/", 1)[-1]


def assign_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """Split by source (never by clip), so clips of one video never straddle splits;
    ``key`` is :func:`split_key` of the source's URI."""
    bucket = int(hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16)
    bucket /= 0xFFFFFFFF
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
        "has_audio": clip.has_audio,
        "clip_uri": clip.uri,
        "copy_mode": clip.copy_mode,
        "keep": clip.keep,
        "phash": clip.phash,
        "duplicate_of": clip.duplicate_of,
        "caption": clip.caption,
        "caption_backend": clip.caption_backend,
        "caption_model": clip.caption_model,
        "caption_verdict": clip.caption_verdict,
        "caption_error": clip.caption_error,
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
        "speech_verdict": clip.speech_verdict,
        "speech_error": clip.speech_error,
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


def source_row(uri: str, result: SourceResult) -> dict[str, Any]:
    src = result.source or {}
    q = result.quarantine or {}
    clips = result.clip_records()
    return {
        "schema_version": SCHEMA_VERSION,
        "uri": result.source_uri,
        "source_id": result.source_id,
        "status": result.status,
        "clips": len(clips),
        "clips_kept": sum(c.keep for c in clips),
        "media_seconds": result.media_seconds,
        "container": src.get("container", ""),
        "video_codec": src.get("video_codec", ""),
        "audio_codec": src.get("audio_codec", ""),
        "width": src.get("width"),
        "height": src.get("height"),
        "display_width": src.get("display_width"),
        "display_height": src.get("display_height"),
        "rotation": src.get("rotation"),
        "sample_aspect_ratio": src.get("sample_aspect_ratio"),
        "fps": src.get("fps"),
        "variable_frame_rate": src.get("variable_frame_rate"),
        "has_audio": src.get("has_audio"),
        "audio_streams": src.get("audio_streams"),
        "fingerprint": result.fingerprint,
        "stage_failed": q.get("stage", ""),
        "reason": q.get("reason", ""),
        "cpu_seconds": result.cpu_seconds,
        "peak_rss_mb": result.peak_rss_mb,
    }


def sources_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["uri"]), schema=SOURCE_SCHEMA)


SCHEMAS = {
    "clips": CLIP_SCHEMA,
    "quarantine": QUARANTINE_SCHEMA,
    "shots": SHOT_SCHEMA,
    "sources": SOURCE_SCHEMA,
}


def _metadata(run_config: dict[str, Any] | None, version: int | None) -> dict[bytes, bytes]:
    metadata = {b"duet.schema_version": str(SCHEMA_VERSION).encode()}
    if run_config is not None:
        metadata[b"duet.run_config"] = json.dumps(run_config, sort_keys=True).encode()
    if version is not None:
        metadata[b"duet.manifest_version"] = str(version).encode()
    return metadata


def _write(
    table: pa.Table, uri: str, run_config: dict[str, Any] | None, version: int | None = None
) -> None:
    metadata = dict(table.schema.metadata or {})
    metadata.update(_metadata(run_config, version))
    table = table.replace_schema_metadata(metadata)
    with storage.local_output(uri) as path:
        pq.write_table(table, path)


def manifest_uris(out_uri: str, version: int | None = None) -> dict[str, str]:
    """The tables of one version (default: the newest)."""
    return {name: manifest_table_uri(out_uri, name, version) for name in SCHEMAS}


def list_versions(out_uri: str) -> list[int]:
    """Every complete version (one with its ``_run.json``), oldest first."""
    root = manifest_root(out_uri)
    fs = storage.filesystem(root)
    path = storage.strip_scheme(root)
    if not fs.exists(path):
        return []
    versions = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("v=") and name[2:].isdigit():
            if fs.exists(f"{entry.rstrip('/')}/_run.json"):
                versions.append(int(name[2:]))
    return sorted(versions)


def write_manifest(
    out_uri: str,
    clips: list[ClipRecord],
    quarantine: list[QuarantineRecord],
    shots: list[ShotRecord],
    run_config: dict[str, Any] | None = None,
    sources: list[dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Write the tables as a new version in one go (small manifests, tests, tools);
    the flow streams through :class:`ManifestWriter` instead."""
    version = (latest_version(out_uri) or 0) + 1
    base = version_uri(out_uri, version)
    uris = {name: storage.join(base, f"{name}.parquet") for name in SCHEMAS}
    _write(shots_table(shots), uris["shots"], run_config, version)
    _write(quarantine_table(quarantine), uris["quarantine"], run_config, version)
    _write(sources_table(sources or []), uris["sources"], run_config, version)
    _write(clips_table(clips), uris["clips"], run_config, version)
    _commit_version(out_uri, version, {"run_config": run_config})
    return uris


def _commit_version(out_uri: str, version: int, run: dict[str, Any]) -> None:
    storage.write_json(storage.join(version_uri(out_uri, version), "_run.json"), run)
    # The pointer last: its move is what makes the version the latest.
    storage.write_json(
        storage.join(manifest_root(out_uri), LATEST_POINTER),
        {"version": version, "path": f"v={version:06d}", "schema_version": SCHEMA_VERSION},
    )


class ManifestWriter:
    """Streams per-source results into a new manifest version.

    ``uris``: every input of the run (their sorted order fixes the row order and
    the groups). ``add`` takes results in any order; ``finish`` writes the tables
    and moves the pointer. Near-duplicates are marked group by group against the
    kept clips of all earlier groups (:class:`curation.quality.DuplicateIndex`).
    """

    def __init__(
        self,
        out_uri: str,
        uris: list[str],
        run_config: dict[str, Any],
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        max_duplicate_bits: int = 8,
        group_size: int = 256,
        speech: bool = False,
    ):
        self.out_uri = out_uri
        self.run_config = run_config
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_duplicate_bits = max_duplicate_bits
        self.speech = speech
        self.order = {uri: i for i, uri in enumerate(sorted(uris))}
        if len(self.order) != len(uris):
            raise ManifestError("duplicate input URIs")
        self.group_size = max(1, group_size)
        self.num_groups = (len(uris) + self.group_size - 1) // self.group_size
        self.version = (latest_version(out_uri) or 0) + 1
        self.base = version_uri(out_uri, self.version)
        # A killed run may have left parts of this (never committed) version.
        storage.remove(self.base, recursive=True)
        self._pending: dict[int, dict[int, tuple[SourceResult, dict[str, Any] | None]]] = {}
        self._next_group = 0
        self._parts: dict[str, list[str]] = {name: [] for name in SCHEMAS}
        self._duplicates = DuplicateIndex(max_duplicate_bits)
        self.counts = {"curated": 0, "no_clips": 0, "quarantined": 0}
        self.clips = 0
        self.clips_kept = 0
        self.max_pending = 0

    def _group_len(self, group: int) -> int:
        return min(self.group_size, len(self.order) - group * self.group_size)

    def add(self, uri: str, result: dict[str, Any], speech: dict[str, Any] | None = None) -> None:
        pos = self.order[uri]
        group = pos // self.group_size
        self._pending.setdefault(group, {})[pos] = (SourceResult.from_dict(result), speech)
        self.max_pending = max(self.max_pending, sum(len(g) for g in self._pending.values()))
        while self._next_group < self.num_groups and len(
            self._pending.get(self._next_group, {})
        ) == self._group_len(self._next_group):
            self._flush(self._next_group)
            self._next_group += 1

    def _flush(self, group: int) -> None:
        entries = self._pending.pop(group)
        clips: list[ClipRecord] = []
        quarantine: list[QuarantineRecord] = []
        shots: list[ShotRecord] = []
        sources: list[dict[str, Any]] = []
        for pos in sorted(entries):
            result, speech = entries[pos]
            self.counts[result.status] += 1
            if result.quarantine:
                quarantine.append(QuarantineRecord.from_dict(result.quarantine))
            shots += result.shot_records()
            for clip in result.clip_records():
                apply_speech(clip, speech, self.speech)
                key = split_key(clip.source_uri)
                clip.split = assign_split(key, self.val_fraction, self.test_fraction)
                clips.append(clip)
            sources.append((pos, result))
        mark_near_duplicates(clips, self.max_duplicate_bits, self._duplicates)
        self.clips += len(clips)
        self.clips_kept += sum(c.keep for c in clips)
        by_source: dict[str, list[ClipRecord]] = {}
        for clip in clips:
            by_source.setdefault(clip.source_id, []).append(clip)
        source_rows = []
        for _, result in sources:
            # Keep counts after duplicate marking, from the clips as written.
            result.clips = [c.to_dict() for c in by_source.get(result.source_id, [])]
            source_rows.append(source_row(result.source_uri, result))
        tables = {
            "clips": clips_table(clips),
            "quarantine": quarantine_table(quarantine),
            "shots": shots_table(shots),
            "sources": sources_table(source_rows),
        }
        for name, table in tables.items():
            uri = storage.join(self.base, "_parts", f"{name}-{group:06d}.parquet")
            _write(table, uri, None)
            self._parts[name].append(uri)

    def finish(self, summary: dict[str, Any] | None = None) -> dict[str, str]:
        if self._next_group != self.num_groups:
            missing = len(self.order) - sum(self.counts.values())
            raise ManifestError(f"{missing} source(s) never reported; the manifest is incomplete")
        uris = {}
        # Clips last: with the pointer, its presence marks the version complete.
        for name in ("shots", "quarantine", "sources", "clips"):
            uri = storage.join(self.base, f"{name}.parquet")
            schema = SCHEMAS[name].with_metadata(_metadata(self.run_config, self.version))
            with storage.local_output(uri) as path:
                with pq.ParquetWriter(path, schema) as writer:
                    for part in self._parts[name]:
                        with storage.local_copy(part) as part_path:
                            table = pq.read_table(part_path)
                        if table.num_rows:
                            writer.write_table(table.replace_schema_metadata(schema.metadata))
            uris[name] = uri
        storage.remove(storage.join(self.base, "_parts"), recursive=True)
        run = {
            "version": self.version,
            "run_config": self.run_config,
            "counts": self.counts,
            "clips": self.clips,
            "clips_kept": self.clips_kept,
            "summary": summary or {},
        }
        _commit_version(self.out_uri, self.version, run)
        uris["version"] = str(self.version)
        return uris


def apply_speech(clip: ClipRecord, speech: dict[str, Any] | None, speech_on: bool) -> None:
    """Merge a source's speech payload into its clip, with the clip's speech verdict."""
    if not speech_on:
        return
    if not clip.has_audio:
        clip.speech_verdict = "no_audio"
        return
    if speech is None:
        clip.speech_verdict = "speech_failed"
        clip.speech_error = "no speech result"
        return
    if speech.get("error"):
        clip.speech_verdict = "speech_failed"
        clip.speech_error = str(speech["error"])[:500]
        return
    fields = (speech.get("clips") or {}).get(clip.clip_id)
    if fields is None:
        clip.speech_verdict = "speech_failed"
        clip.speech_error = "clip missing from the speech result"
        return
    for key, value in fields.items():
        setattr(clip, key, value)
    clip.speech_verdict = "transcribed" if clip.transcript.strip() else "no_speech"


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


def read_clips(out_uri: str, version: int | None = None) -> pa.Table:
    return read_table(manifest_uris(out_uri, version)["clips"])
