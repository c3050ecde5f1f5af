"""Prefect flow ``curate``: raw footage -> clips + versioned Parquet manifest + report.

The flow only orders steps: discover the inputs, run the sources (the executor in
``flows.executor`` runs each source's stage list on Ray and streams every finished
source into the manifest writer), write the manifest version, write the report.
``ray_address`` joins an existing cluster; without it a local Ray is started.

Resume: every source commits its result (and every speech pass its transcript)
under ``OUT/work/``, keyed by a fingerprint of the config and the stages' code
versions, with a marker written last. A rerun skips what is committed for the
same settings and redoes the rest; the new manifest version is built from the
committed results, sorted, so it equals an uninterrupted run's.

Accounting: every input ends up in exactly one of ``curated``, ``no_clips`` or
``quarantined`` (``sources.parquet``); the flow checks that they add up.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core import storage
from core.config import load_config
from curation.manifest import ManifestWriter, read_table
from curation.pipeline import CurateConfig, SourcePipeline, source_fingerprint
from curation.report import write_report
from flows import executor

VIDEO_SIDECAR_SUFFIX = ".json"


# Progress callbacks ``(phase, done, total)``; the CLI registers one to drive its
# progress bar. Kept out of the flow's parameters, which Prefect serialises.
PROGRESS_HOOKS: list[Callable[[str, int, int], None]] = []


def _progress(phase: str, done: int, total: int) -> None:
    for hook in list(PROGRESS_HOOKS):
        hook(phase, done, total)


def discover_inputs(input_glob: str) -> list[str]:
    """Files matching the glob, minus the JSON sidecars that sit beside matched videos."""
    matched = storage.glob(input_glob)
    stems = {posixpath.splitext(u)[0] for u in matched if not u.lower().endswith(".json")}
    return [
        u
        for u in matched
        if not (u.lower().endswith(VIDEO_SIDECAR_SUFFIX) and posixpath.splitext(u)[0] in stems)
    ]


def resolve_config(config: dict[str, Any] | None, config_uri: str | None) -> CurateConfig:
    """``config_uri`` (TOML/JSON at any URI) with ``config``'s fields over it."""
    base = load_config(CurateConfig, config_uri).to_dict() if config_uri else {}
    for key, value in (config or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return CurateConfig.from_dict(base)


class RunTotals:
    """What the run cost, summed as sources finish (a few numbers, not the results)."""

    def __init__(self) -> None:
        self.media_seconds = 0.0
        self.cpu_seconds = 0.0
        self.stage_seconds: dict[str, float] = {}
        self.stage_cpu_seconds: dict[str, float] = {}
        self.peak_rss_mb = 0.0
        self.failed: dict[str, str] = {}
        self.copy_modes: dict[str, int] = {}
        self.speech_compute_seconds = 0.0
        self.speech_media_seconds = 0.0

    def add_speech(self, payload: dict[str, Any] | None) -> None:
        if payload:
            self.speech_compute_seconds += payload.get("compute_seconds", 0.0)
            self.speech_media_seconds += payload.get("media_seconds", 0.0)

    def add(self, result: dict[str, Any]) -> None:
        self.media_seconds += result.get("media_seconds", 0.0)
        self.cpu_seconds += result.get("cpu_seconds", 0.0)
        for name, value in result.get("stage_seconds", {}).items():
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + value
        for name, value in result.get("stage_cpu_seconds", {}).items():
            self.stage_cpu_seconds[name] = self.stage_cpu_seconds.get(name, 0.0) + value
        self.peak_rss_mb = max(self.peak_rss_mb, result.get("peak_rss_mb", 0.0))
        q = result.get("quarantine") or {}
        if q.get("stage") == "executor":
            self.failed[q.get("uri", "")] = f"{q.get('error_type')}: {q.get('reason')}"
        for clip in result.get("clips", []):
            mode = clip.get("copy_mode", "")
            self.copy_modes[mode] = self.copy_modes.get(mode, 0) + 1


@task(name="discover", cache_policy=NO_CACHE)
def discover_task(input_glob: str) -> list[str]:
    uris = discover_inputs(input_glob)
    get_run_logger().info("%d input file(s) match %s", len(uris), input_glob)
    return uris


@task(name="sources", cache_policy=NO_CACHE)
def sources_task(
    uris: list[str],
    out_uri: str,
    config: CurateConfig,
    cpus_per_source: float,
    speech: bool,
    speech_config: dict[str, Any],
    speech_workers: int,
    speech_batch_size: int,
    max_in_flight: int | None,
) -> tuple[ManifestWriter, RunTotals, dict[str, int]]:
    """Every source through the executor, each streamed into the manifest writer."""
    writer = ManifestWriter(
        out_uri,
        uris,
        run_config=config.to_dict(),
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        max_duplicate_bits=config.quality.max_duplicate_bits,
        speech=speech,
    )
    totals = RunTotals()

    def on_done(uri: str, result: dict[str, Any], speech_payload, skipped: bool) -> None:
        totals.add(result)
        totals.add_speech(speech_payload)
        writer.add(uri, result, speech_payload)

    _progress("sources", 0, len(uris))
    counts = executor.run_sources(
        uris,
        out_uri,
        config.to_dict(),
        source_fingerprint(config),
        on_done,
        cpus_per_source=cpus_per_source,
        max_in_flight=max_in_flight,
        speech=speech,
        speech_config=speech_config,
        speech_workers=speech_workers,
        speech_batch_size=speech_batch_size,
        on_progress=_progress,
    )
    get_run_logger().info(
        "%d source(s) run, %d already committed, %d failed in the executor",
        counts["ran"],
        counts["skipped"],
        counts["executor_failures"],
    )
    return writer, totals, counts


@task(name="manifest", cache_policy=NO_CACHE)
def manifest_task(writer: ManifestWriter, inputs: int, summary: dict[str, Any]) -> dict[str, str]:
    accounted = sum(writer.counts.values())
    if accounted != inputs:
        raise RuntimeError(f"{inputs} inputs but {accounted} accounted for: {writer.counts}")
    return writer.finish(summary)


@task(name="report", cache_policy=NO_CACHE)
def report_task(out_uri: str, uris: dict[str, str], summary: dict[str, Any]) -> str:
    return write_report(
        out_uri,
        read_table(uris["clips"]),
        read_table(uris["quarantine"]),
        summary,
        sources=read_table(uris["sources"]),
    )


@flow(name="curate", log_prints=True)
def curate(
    input_glob: str,
    out_uri: str,
    ray_address: str | None = None,
    config: dict[str, Any] | None = None,
    config_uri: str | None = None,
    speech: bool = False,
    speech_config: dict[str, Any] | None = None,
    speech_workers: int = 1,
    speech_batch_size: int = 8,
    num_cpus: int | None = None,
    cpus_per_source: float | None = None,
    max_in_flight: int | None = None,
) -> dict[str, Any]:
    """Curate every file matching ``input_glob`` into ``out_uri``.

    ``config_uri``: a TOML/JSON :class:`CurateConfig` at any URI; ``config``: fields
    as a dict, applied over it. ``speech_config``: ``curation.speech.SpeechConfig``
    fields. ``cpus_per_source`` defaults to what the stages declare;
    ``max_in_flight`` to twice the cluster's CPUs. Returns a summary with the
    manifest and report URIs.
    """
    # The sources run as Ray tasks, in working directories of Ray's choosing.
    input_glob, out_uri = storage.absolute_uri(input_glob), storage.absolute_uri(out_uri)
    cfg = resolve_config(config, config_uri)
    if cpus_per_source is None:
        cpus_per_source = SourcePipeline(cfg).resources["num_cpus"]
    started_ray = executor.init_ray(ray_address, num_cpus)
    t0 = time.perf_counter()
    try:
        uris = discover_task(input_glob)
        writer, totals, counts = sources_task(
            uris,
            out_uri,
            cfg,
            cpus_per_source,
            speech,
            speech_config or {},
            speech_workers,
            speech_batch_size,
            max_in_flight,
        )
        wall = time.perf_counter() - t0
        summary = {
            "inputs": len(uris),
            **{f"sources {k}": v for k, v in writer.counts.items()},
            "sources run (this run)": counts["ran"],
            "sources reused (committed)": counts["skipped"],
            "executor failures": counts["executor_failures"],
            "media seconds": round(totals.media_seconds, 2),
            "wall seconds (this run)": round(wall, 2),
            "speech": "on" if speech else "off",
            "speech failures": counts["speech_failures"],
            "caption backend": cfg.captions.backend,
            "clips stream-copied / re-encoded": (
                f"{totals.copy_modes.get('stream_copy', 0)} / "
                f"{totals.copy_modes.get('reencode', 0)}"
            ),
            "peak worker RSS (MB)": round(totals.peak_rss_mb, 1),
            **{
                f"media-s per CPU-s: {name}": round(totals.media_seconds / max(seconds, 1e-9), 2)
                for name, seconds in sorted(totals.stage_cpu_seconds.items())
            },
        }
        outputs = manifest_task(writer, len(uris), summary)
        report = report_task(out_uri, outputs, summary)
    finally:
        if started_ray:
            executor.shutdown_ray()
    return {
        **outputs,
        "report": report,
        "inputs": len(uris),
        "counts": dict(writer.counts),
        "failed": totals.failed,
        "sources_skipped": counts["skipped"],
        "sources_run": counts["ran"],
        "media_seconds": totals.media_seconds,
        "sources_wall_s": wall,
        "cpu_seconds": totals.cpu_seconds,
        "stage_seconds": totals.stage_seconds,
        "stage_cpu_seconds": totals.stage_cpu_seconds,
        "peak_worker_rss_mb": totals.peak_rss_mb,
        "copy_modes": totals.copy_modes,
        "speech_compute_seconds": totals.speech_compute_seconds,
        "speech_media_seconds": totals.speech_media_seconds,
        "max_pending_results": writer.max_pending,
        "fingerprint": source_fingerprint(cfg),
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Run the curate flow (see `duet curate`).")
    parser.add_argument("input_glob")
    parser.add_argument("out_uri")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--config-json", default=None, help="CurateConfig fields as JSON")
    parser.add_argument("--config-uri", default=None, help="CurateConfig TOML/JSON at a URI")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args()
    summary = curate(
        args.input_glob,
        args.out_uri,
        ray_address=args.ray_address,
        config=json.loads(args.config_json) if args.config_json else None,
        config_uri=args.config_uri,
        num_cpus=args.num_cpus,
    )
    print(json.dumps(summary, indent=2, default=str))
