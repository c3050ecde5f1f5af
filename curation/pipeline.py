"""One source through the stage list, committed as one unit.

The pipeline is a list of :class:`curation.stage.Stage` s: source stages
(validate, segment) run once; clip stages (quality, sync, captions, write) run on
each clip window the segment stage hands out, while the source is still being
decoded, so a source of any length is processed in bounded memory.

Every exception in any stage is caught and recorded: the source is quarantined
with the stage, the error type and the message, and the clip files it had written
are removed. Nothing is lost silently.

Resume: the result is committed under ``OUT/work/sources/<source_id>/<fingerprint>/``
(``result.json`` then a marker). The fingerprint hashes the config sections the
source pass depends on and every stage's code version, so a run with other
settings (or changed stage code) recomputes, and a run with the same ones skips.
Ray and Prefect only call this; it runs without either.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from core import media, storage
from core.config import config_from_dict, config_to_dict
from curation.captions import CaptionConfig, CaptionStage
from curation.clips import ClipConfig, ClipWriteStage
from curation.quality import QualityConfig, QualityStage
from curation.records import QuarantineRecord, SourceResult, display_uri, source_id_of
from curation.segment import DecodeConfig, SegmentStage
from curation.shots import ShotConfig
from curation.stage import SourceContext, SourceRejected, Stage, stage_versions
from curation.sync import SyncConfig, SyncStage
from curation.validate import ValidateConfig, ValidateStage

RESULT_NAME = "result.json"
# Config sections that do not change what a source pass produces.
NOT_IN_SOURCE_FINGERPRINT = ("val_fraction", "test_fraction")


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
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurateConfig:
        return config_from_dict(cls, data)


def build_stages(config: CurateConfig) -> list[Stage]:
    """The source pipeline, in order."""
    return [
        ValidateStage(config.validate),
        SegmentStage(config.decode, config.shots, config.clips),
        QualityStage(config.quality),
        SyncStage(config.sync),
        CaptionStage(config.captions),
        ClipWriteStage(config.clips),
    ]


def source_fingerprint(config: CurateConfig, stages: list[Stage] | None = None) -> str:
    """12 hex digits naming (config of the source pass, every stage's code version)."""
    stages = stages if stages is not None else build_stages(config)
    data = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_SOURCE_FINGERPRINT}
    data["_stages"] = stage_versions(stages)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def source_work_uri(out_uri: str, source_id: str, fingerprint: str) -> str:
    return storage.join(out_uri, "work", "sources", source_id, fingerprint)


def load_committed(out_uri: str, source_uri: str, fingerprint: str) -> SourceResult | None:
    """The committed result of ``source_uri`` under this fingerprint, or None."""
    work = source_work_uri(out_uri, source_id_of(source_uri), fingerprint)
    if not storage.is_committed(work):
        return None
    return SourceResult.from_dict(storage.read_json(storage.join(work, RESULT_NAME)))


def commit(out_uri: str, result: SourceResult) -> None:
    """Result first, marker last: a reader that sees the marker sees the whole result."""
    work = source_work_uri(out_uri, result.source_id, result.fingerprint)
    storage.write_json(storage.join(work, RESULT_NAME), result.to_dict())
    storage.write_marker(work, {"source_id": result.source_id, "clips": len(result.clips)})


class SourcePipeline:
    """``uri -> SourceResult``: the stage list over one source."""

    def __init__(self, config: CurateConfig | None = None):
        self.config = config or CurateConfig()
        self.stages = build_stages(self.config)
        self.fingerprint = source_fingerprint(self.config, self.stages)
        self.source_stages = [s for s in self.stages if s.kind == "source"]
        self.clip_stages = [s for s in self.stages if s.kind == "clip"]
        # The source task runs every stage in turn: it needs what the hungriest asks for.
        self.resources = {"num_cpus": max(s.resources.cpus for s in self.stages)}
        self._set_up = False

    def setup(self) -> None:
        if not self._set_up:
            for stage in self.stages:
                stage.setup()
            self._set_up = True

    def teardown(self) -> None:
        if self._set_up:
            for stage in self.stages:
                stage.teardown()
            self._set_up = False

    def __call__(self, uri: str, out_uri: str) -> SourceResult:
        self.setup()
        cpu0 = _cpu_seconds()
        result = SourceResult(
            source_uri=display_uri(uri), source_id=source_id_of(uri), fingerprint=self.fingerprint
        )
        ctx = SourceContext(
            uri=uri, out_uri=out_uri, source_id=result.source_id, fingerprint=self.fingerprint
        )
        meter = _StageMeter()
        stage_name = "validate"
        try:
            self.stages[0].precheck(uri)
            stage_name = "read"
            with media.local_path(uri) as path:
                ctx.path = path
                for stage in self.source_stages:
                    stage_name = stage.name
                    with meter(stage.name):
                        stage.process(ctx)
                    if stage.name == "validate":
                        result.source = ctx.source.to_dict()
                if ctx.source.has_audio:
                    stage_name = "audio"
                    ctx.audio = media.AudioReader(
                        path, origin_s=ctx.source.start_s, stream_index=ctx.source.audio_stream
                    )
                try:
                    windows = ctx.windows or iter(())
                    while True:
                        stage_name = "segment"
                        with meter("segment"):
                            window = next(windows, None)
                        if window is None:
                            break
                        ctx.window = window
                        for stage in self.clip_stages:
                            stage_name = stage.name
                            with meter(stage.name):
                                stage.process(ctx)
                        ctx.window = None
                finally:
                    if ctx.audio is not None:
                        ctx.audio.close()
            result.shots = [s.to_dict() for s in ctx.shots]
            result.clips = [c.to_dict() for c in ctx.clips]
            result.media_seconds = ctx.notes.get("frames", 0) / ctx.source.fps
        except Exception as err:  # noqa: BLE001 - every failure is recorded, none is fatal
            self._quarantine(result, ctx, stage_name, err)
        result.stage_seconds = meter.wall
        result.stage_cpu_seconds = meter.cpu
        result.cpu_seconds = _cpu_seconds() - cpu0
        result.peak_rss_mb = _peak_rss_mb()
        return result

    def _quarantine(self, result: SourceResult, ctx: SourceContext, stage: str, err: Exception):
        if isinstance(err, SourceRejected):
            reason, error_type = err.reason, "rejected"
        elif isinstance(err, media.MediaError):
            reason, error_type = err.reason, "MediaError"
        else:
            reason, error_type = f"{err}"[:1000] or repr(err), type(err).__name__
        result.quarantine = QuarantineRecord(
            uri=display_uri(ctx.uri),
            source_id=result.source_id,
            stage=stage,
            reason=reason,
            size_bytes=ctx.source.size_bytes if ctx.source else getattr(err, "size_bytes", -1),
            error_type=error_type,
        ).to_dict()
        # Clips written before the failure belong to no manifest: remove them.
        for clip in ctx.clips:
            if clip.uri:
                try:
                    storage.remove(clip.uri)
                except OSError:
                    pass
        result.clips, result.shots = [], []


class _StageMeter:
    """Wall and CPU seconds per stage. CPU is this process's (a Ray worker runs one
    source at a time, and decoder threads belong to the stage that drives them)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._name = ""

    def __call__(self, name: str):
        self._name = name
        return self

    def __enter__(self):
        self._stack = getattr(self, "_stack", [])
        self._stack.append((self._name, time.perf_counter(), _cpu_seconds()))
        return self

    def __exit__(self, *exc):
        name, t0, c0 = self._stack.pop()
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
        self.cpu[name] = self.cpu.get(name, 0.0) + _cpu_seconds() - c0
        return False


def _cpu_seconds() -> float:
    # This process's user + system time, all threads (PyAV decodes on several).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux carries
    ``ru_maxrss`` across exec, so a worker forked from a big parent would report
    the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def process_source(
    uri: str, out_uri: str, config: CurateConfig, pipeline: SourcePipeline | None = None
) -> tuple[SourceResult, bool]:
    """Run and commit one source unless already committed. Returns (result, was_skipped)."""
    pipeline = pipeline or SourcePipeline(config)
    done = load_committed(out_uri, uri, pipeline.fingerprint)
    if done is not None:
        return done, True
    result = pipeline(uri, out_uri)
    commit(out_uri, result)
    return result, False


_PIPELINES: dict[str, SourcePipeline] = {}


def process_source_remote(
    uri: str, out_uri: str, config: dict[str, Any], env: dict[str, str]
) -> dict[str, Any]:
    """Ray's entry point for one source (lives here, not in ``flows``, so a worker
    imports only the curation stages, not Prefect). A pooled worker keeps one set
    up pipeline per config, so stage ``setup`` (a caption model) happens once.

    ``env``: the driver's storage settings, applied in the worker. Passing them as
    an argument rather than a per-task runtime_env lets Ray reuse pooled workers
    instead of starting a dedicated process per distinct environment.
    """
    os.environ.update(env)
    key = json.dumps(config, sort_keys=True, default=str)
    pipeline = _PIPELINES.get(key)
    if pipeline is None:
        pipeline = _PIPELINES[key] = SourcePipeline(CurateConfig.from_dict(config))
    try:
        result, skipped = process_source(uri, out_uri, pipeline.config, pipeline)
    except Exception as err:  # noqa: BLE001 - a commit that fails is this source's failure
        result = SourceResult(
            source_uri=display_uri(uri),
            source_id=source_id_of(uri),
            fingerprint=pipeline.fingerprint,
        )
        result.quarantine = QuarantineRecord(
            uri=display_uri(uri),
            source_id=result.source_id,
            stage="commit",
            reason=str(err)[:1000],
            error_type=type(err).__name__,
        ).to_dict()
        skipped = False
    return {"result": result.to_dict(), "skipped": skipped}
