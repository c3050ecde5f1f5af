"""One source through every decode-bound stage, committed as one unit.

``process_source`` validates, decodes once, detects shots, cuts clips, scores
quality, measures AV sync, captions, writes the clip MP4s and finally commits a
``result.json`` plus a marker under ``OUT/work/sources/<source_id>/``. A source
with a marker is never redone; a source without one is redone from scratch, and
because clip ids and file names are a function of (source, time range) the redo
overwrites, never duplicates. Ray and Prefect only call this; it runs without
either.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from core import media, storage
from core.config import config_from_dict
from curation.captions import CaptionConfig, CaptionStage
from curation.clips import ClipConfig, ClipStage
from curation.decode import DecodeConfig, DecodeStage
from curation.quality import QualityConfig, QualityStage
from curation.records import (
    QuarantineRecord,
    SourceRecord,
    SourceResult,
    display_uri,
    source_id_of,
)
from curation.shots import ShotConfig, ShotStage
from curation.sync import SyncConfig, SyncStage
from curation.validate import ValidateConfig, ValidateStage

RESULT_NAME = "result.json"


@dataclass(frozen=True)
class CurateConfig:
    """Every knob of a curation run; recorded in the manifest's metadata."""

    validate: ValidateConfig = field(default_factory=ValidateConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shots: ShotConfig = field(default_factory=ShotConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    val_fraction: float = 0.1
    test_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurateConfig:
        return config_from_dict(cls, data)


def source_work_uri(out_uri: str, source_id: str) -> str:
    return storage.join(out_uri, "work", "sources", source_id)


def load_committed(out_uri: str, source_uri: str) -> SourceResult | None:
    """The committed result of ``source_uri`` in ``out_uri``, or None if not committed."""
    work = source_work_uri(out_uri, source_id_of(source_uri))
    if not storage.is_committed(work):
        return None
    return SourceResult.from_dict(storage.read_json(storage.join(work, RESULT_NAME)))


def commit(out_uri: str, result: SourceResult) -> None:
    """Result first, marker last: a reader that sees the marker sees the whole result."""
    work = source_work_uri(out_uri, result.source_id)
    storage.write_json(storage.join(work, RESULT_NAME), result.to_dict())
    storage.write_marker(work, {"source_id": result.source_id, "clips": len(result.clips)})


class SourcePipeline:
    """``uri -> SourceResult``: the decode-bound stages of one source, in order."""

    def __init__(self, config: CurateConfig | None = None):
        self.config = config or CurateConfig()
        cfg = self.config
        self.validate = ValidateStage(cfg.validate)
        self.decode = DecodeStage(cfg.decode)
        self.shots = ShotStage(cfg.shots)
        self.clips = ClipStage(cfg.clips)
        self.quality = QualityStage(cfg.quality)
        self.sync = SyncStage(cfg.sync)
        self.captions = CaptionStage(cfg.captions)
        stages = (self.validate, self.decode, self.shots, self.clips, self.quality, self.sync)
        # The source task runs every stage in turn: it needs what the hungriest asks for.
        self.resources = {
            "num_cpus": max(s.resources["num_cpus"] for s in (*stages, self.captions))
        }

    def __call__(self, uri: str, out_uri: str) -> SourceResult:
        cpu0 = _cpu_seconds()
        timings: dict[str, float] = {}
        result = SourceResult(source_uri=display_uri(uri), source_id=source_id_of(uri))

        def timed(name: str, fn, *args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

        stage = "validate"
        try:
            checked = timed(stage, self.validate, uri)
            if isinstance(checked, QuarantineRecord):
                result.quarantine = checked.to_dict()
                return self._finish(result, timings, cpu0)
            source: SourceRecord = checked
            result.source = source.to_dict()
            stage = "decode"
            decoded = timed(stage, self.decode, source)
            result.media_seconds = decoded.duration_s
            stage = "shots"
            shots = timed(stage, self.shots, decoded)
            result.shots = [s.to_dict() for s in shots]
            stage = "clips"
            clips = timed(stage, self.clips, decoded, shots)
            for clip in clips:
                a, b = clip.start_frame, clip.end_frame
                luma = decoded.small_luma[a:b]
                audio = _audio_span(decoded, a, b)
                stage = "quality"
                timed(stage, self.quality, clip, luma, audio, decoded.sample_rate)
                stage = "sync"
                timed(stage, self.sync, clip, luma, audio, decoded.sample_rate)
                stage = "captions"
                timed(stage, self.captions, clip, decoded.frames[a:b])
                stage = "encode"
                timed(stage, self.clips.write, decoded, clip, out_uri)
            result.clips = [c.to_dict() for c in clips]
        except media.MediaError as err:
            result.quarantine = QuarantineRecord(
                uri=display_uri(uri),
                source_id=result.source_id,
                stage=stage,
                reason=err.reason,
                size_bytes=(result.source or {}).get("size_bytes", -1),
            ).to_dict()
            result.clips, result.shots = [], []
        return self._finish(result, timings, cpu0)

    def _finish(self, result: SourceResult, timings: dict[str, float], cpu0: float) -> SourceResult:
        result.stage_seconds = timings
        result.cpu_seconds = _cpu_seconds() - cpu0
        return result


def _audio_span(decoded, start_frame: int, end_frame: int):
    rate = decoded.sample_rate
    a = int(round(start_frame / decoded.fps * rate))
    b = int(round(end_frame / decoded.fps * rate))
    return decoded.audio[:, a:b]


def _cpu_seconds() -> float:
    # This process's user + system time, all threads (PyAV decodes on several).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_source(uri: str, out_uri: str, config: CurateConfig) -> tuple[SourceResult, bool]:
    """Run and commit one source unless already committed. Returns (result, was_skipped)."""
    done = load_committed(out_uri, uri)
    if done is not None:
        return done, True
    result = SourcePipeline(config)(uri, out_uri)
    commit(out_uri, result)
    return result, False


def process_source_remote(
    uri: str, out_uri: str, config: dict[str, Any], env: dict[str, str]
) -> dict[str, Any]:
    """Ray's entry point for one source (lives here, not in ``flows``, so a worker
    imports only the curation stages, not Prefect).

    ``env``: the driver's storage settings, applied in the worker. Passing them as
    an argument rather than a per-task runtime_env lets Ray reuse pooled workers
    instead of starting a dedicated process per distinct environment.
    """
    os.environ.update(env)
    result, skipped = process_source(uri, out_uri, CurateConfig.from_dict(config))
    return {"result": result.to_dict(), "skipped": skipped}
