"""Prefect flow ``curate``: raw footage -> clips + versioned Parquet manifest + report.

Prefect orchestrates four tasks (discover, sources, speech, manifest); the
parallel work inside them runs on Ray: one Ray task per source (declared
``num_cpus``) runs every decode-bound stage on frames decoded once
(:class:`curation.pipeline.SourcePipeline`), and a pool of Ray actors runs the
model-bound speech stage. ``ray_address`` joins an existing cluster; without it
a local Ray is started.

Resume: every source commits its result (and every speech pass its transcript)
under ``OUT/work/`` with a marker written last. A rerun after a kill skips what
is committed and redoes only the rest; the manifest is rebuilt from the committed
results, sorted, so it equals an uninterrupted run's.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core import storage
from curation import manifest as manifest_mod
from curation.pipeline import (
    CurateConfig,
    SourcePipeline,
    load_committed,
    process_source_remote,
)
from curation.quality import mark_near_duplicates
from curation.records import ClipRecord, QuarantineRecord, ShotRecord, SourceResult
from curation.report import write_report
from curation.transcribe import SpeechActor, load_speech

# Environment the Ray workers need to reach storage (loopback S3 in tests, a real
# endpoint in production) and Duet's caches; forwarded explicitly because a Ray
# cluster started before these were set would not see them.
FORWARDED_ENV_PREFIXES = ("AWS_", "DUET_")
FORWARDED_ENV = ("HOME",)

VIDEO_SIDECAR_SUFFIX = ".json"

# Progress callbacks ``(phase, done, total)``; the CLI registers one to drive its
# progress bar. Kept out of the flow's parameters, which Prefect serialises.
PROGRESS_HOOKS: list[Callable[[str, int, int], None]] = []


def _progress(phase: str, done: int, total: int) -> None:
    for hook in list(PROGRESS_HOOKS):
        hook(phase, done, total)


def forwarded_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV
    }


def discover_inputs(input_glob: str) -> list[str]:
    """Files matching the glob, minus the JSON sidecars that sit beside matched videos."""
    matched = storage.glob(input_glob)
    stems = {posixpath.splitext(u)[0] for u in matched if not u.lower().endswith(".json")}
    return [
        u
        for u in matched
        if not (u.lower().endswith(VIDEO_SIDECAR_SUFFIX) and posixpath.splitext(u)[0] in stems)
    ]


def init_ray(ray_address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``ray_address`` or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "ignore_reinit_error": True,
        "log_to_driver": False,
        "runtime_env": {"env_vars": forwarded_env()},
    }
    if ray_address:
        ray.init(address=ray_address, **options)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **options)
    return True


@task(name="discover", cache_policy=NO_CACHE)
def discover_task(input_glob: str) -> list[str]:
    uris = discover_inputs(input_glob)
    get_run_logger().info("%d input file(s) match %s", len(uris), input_glob)
    return uris


@task(name="sources", cache_policy=NO_CACHE)
def sources_task(
    uris: list[str], out_uri: str, config: dict[str, Any], cpus_per_source: float
) -> dict[str, Any]:
    """Run every uncommitted source on Ray; return committed results and failures."""
    import ray

    logger = get_run_logger()
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for uri in uris:
        done = load_committed(out_uri, uri)
        if done is not None:
            results[uri] = done.to_dict()
        else:
            todo.append(uri)
    logger.info("%d source(s) already committed, %d to process", len(results), len(todo))
    remote = ray.remote(process_source_remote).options(
        num_cpus=cpus_per_source,
        max_retries=1,  # a worker process that died (OOM, node loss) is retried once
    )
    env = forwarded_env()
    pending = {remote.remote(uri, out_uri, config, env): uri for uri in todo}
    failed: dict[str, str] = {}
    total = len(uris)
    _progress("sources", len(results), total)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        uri = pending.pop(ref)
        try:
            results[uri] = ray.get(ref)["result"]
        except Exception as err:  # noqa: BLE001 - one source's failure must not stop the batch
            failed[uri] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:500]}"
            logger.error("source %s failed: %s", uri, failed[uri])
        _progress("sources", len(results) + len(failed), total)
    return {
        "results": results,
        "failed": failed,
        "skipped": len(uris) - len(todo),
        "ran": len(todo),
    }


@task(name="speech", cache_policy=NO_CACHE)
def speech_task(
    results: dict[str, dict[str, Any]],
    out_uri: str,
    speech_config: dict[str, Any],
    workers: int,
    batch_size: int,
) -> dict[str, Any]:
    """Transcribe every source's clips on a pool of speech actors (skips committed ones)."""
    import ray
    from ray.util import ActorPool

    from curation.speech import SpeechStage

    speech: dict[str, Any] = {}
    todo = []
    for res in results.values():
        if not res.get("clips"):
            continue
        done = load_speech(out_uri, res["source_id"])
        if done is not None:
            speech[res["source_id"]] = done
        else:
            todo.append(res)
    total = len(todo) + len(speech)
    _progress("speech", len(speech), total)
    if todo:
        actor_cls = ray.remote(SpeechActor).options(**SpeechStage.resources)
        env = forwarded_env()
        actors = [actor_cls.remote(speech_config, batch_size, env) for _ in range(max(1, workers))]
        pool = ActorPool(actors)
        for res, payload in zip(
            todo,
            pool.map(lambda actor, r: actor.run.remote(r, out_uri), todo),
            strict=True,
        ):
            speech[res["source_id"]] = payload
            _progress("speech", len(speech), total)
        ray.get([actor.close.remote() for actor in actors])
        for actor in actors:
            ray.kill(actor)
    return speech


def assemble(
    results: dict[str, dict[str, Any]],
    speech: dict[str, Any],
    config: CurateConfig,
) -> tuple[list[ClipRecord], list[QuarantineRecord], list[ShotRecord]]:
    """Merge per-source results and transcripts, mark duplicates, assign splits."""
    from curation.manifest import assign_split

    clips: list[ClipRecord] = []
    quarantine: list[QuarantineRecord] = []
    shots: list[ShotRecord] = []
    for data in results.values():
        res = SourceResult.from_dict(data)
        if res.quarantine:
            quarantine.append(QuarantineRecord.from_dict(res.quarantine))
            continue
        shots += res.shot_records()
        transcripts = (speech.get(res.source_id) or {}).get("clips", {})
        for clip in res.clip_records():
            for key, value in transcripts.get(clip.clip_id, {}).items():
                setattr(clip, key, value)
            clip.split = assign_split(clip.source_id, config.val_fraction, config.test_fraction)
            clips.append(clip)
    mark_near_duplicates(clips, config.quality.max_duplicate_bits)
    return clips, quarantine, shots


@task(name="manifest", cache_policy=NO_CACHE)
def manifest_task(
    out_uri: str,
    results: dict[str, dict[str, Any]],
    speech: dict[str, Any],
    config: dict[str, Any],
    summary: dict[str, Any],
) -> dict[str, str]:
    cfg = CurateConfig.from_dict(config)
    clips, quarantine, shots = assemble(results, speech, cfg)
    uris = manifest_mod.write_manifest(out_uri, clips, quarantine, shots, run_config=config)
    clip_table = manifest_mod.clips_table(clips)
    q_table = manifest_mod.quarantine_table(quarantine)
    uris["report"] = write_report(out_uri, clip_table, q_table, summary)
    return uris


@flow(name="curate", log_prints=True)
def curate(
    input_glob: str,
    out_uri: str,
    ray_address: str | None = None,
    config: dict[str, Any] | None = None,
    speech: bool = False,
    speech_config: dict[str, Any] | None = None,
    speech_workers: int = 1,
    speech_batch_size: int = 8,
    num_cpus: int | None = None,
    cpus_per_source: float | None = None,
) -> dict[str, Any]:
    """Curate every file matching ``input_glob`` into ``out_uri``.

    ``config``: a :class:`CurateConfig` as a dict (``CurateConfig().to_dict()``
    with fields changed); ``speech_config``: ``curation.speech.SpeechConfig``
    fields. ``cpus_per_source`` defaults to what the source pipeline's stages
    declare. Returns a summary with the manifest and report URIs.
    """
    cfg = CurateConfig.from_dict(config or {})
    if cpus_per_source is None:
        cpus_per_source = SourcePipeline(cfg).resources["num_cpus"]
    config_dict = cfg.to_dict()
    started_ray = init_ray(ray_address, num_cpus)
    t0 = time.perf_counter()
    try:
        uris = discover_task(input_glob)
        sources = sources_task(uris, out_uri, config_dict, cpus_per_source)
        results = sources["results"]
        t_sources = time.perf_counter() - t0
        transcripts: dict[str, Any] = {}
        if speech:
            transcripts = speech_task(
                results, out_uri, speech_config or {}, speech_workers, speech_batch_size
            )
        t_speech = time.perf_counter() - t0 - t_sources
        media_s = sum(r.get("media_seconds", 0.0) for r in results.values())
        summary = {
            "inputs": len(uris),
            "failed": len(sources["failed"]),
            "media seconds": round(media_s, 2),
            "decode-bound wall seconds (this run)": round(t_sources, 2),
            "speech wall seconds (this run)": round(t_speech, 2),
            "speech": "on" if speech else "off",
            "caption backend": cfg.captions.backend,
        }
        outputs = manifest_task(out_uri, results, transcripts, config_dict, summary)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return {
        **outputs,
        "inputs": len(uris),
        "failed": sources["failed"],
        "sources_skipped": sources["skipped"],
        "sources_run": sources["ran"],
        "media_seconds": media_s,
        "sources_wall_s": t_sources,
        "speech_wall_s": t_speech,
        "cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in results.values()),
        "stage_seconds": _sum_stage_seconds(results),
        "speech_compute_seconds": sum(t.get("compute_seconds", 0.0) for t in transcripts.values()),
        "speech_media_seconds": sum(t.get("media_seconds", 0.0) for t in transcripts.values()),
    }


def _sum_stage_seconds(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for res in results.values():
        for name, seconds in res.get("stage_seconds", {}).items():
            total[name] = total.get(name, 0.0) + seconds
    return total


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Run the curate flow (see `duet curate`).")
    parser.add_argument("input_glob")
    parser.add_argument("out_uri")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--config-json", default=None, help="CurateConfig fields as JSON")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args()
    summary = curate(
        args.input_glob,
        args.out_uri,
        ray_address=args.ray_address,
        config=json.loads(args.config_json) if args.config_json else None,
        num_cpus=args.num_cpus,
    )
    print(json.dumps(summary, indent=2, default=str))
