"""Prefect flow ``adgen``: a brief -> ad variants -> MP4s and a results table.

The brief is expanded into variants (``pipelines.adgen``); each variant is one job
on the Serve application (the ``fast`` or ``full`` deployment, dynamically batched
and autoscaled there), submitted through the job API with at most ``concurrency``
in flight, so back-pressure (429 + Retry-After) paces the batch. With no
``serve_url`` the flow starts the application on a local Ray for the run.

Every variant's MP4 goes to ``OUT/videos/<variant_id>.mp4`` and its row (parameters,
seed, output URI, latency, compute seconds, estimated cost, probe metrics) to
``OUT/results.parquet``. A variant whose row says succeeded and whose MP4 exists is
skipped by a rerun; a failed variant is recorded with its error and tried again by
the next run; no variant's failure stops the batch.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core import storage
from pipelines.adgen import Variant, load_brief, read_results, result_row, write_results
from pipelines.generation import aspect_size
from serve.client import DuetClient
from serve.config import ServeConfig, serve_config_from
from serve.guards import output_uri

RESULTS_NAME = "results.parquet"
WRITE_EVERY = 10  # results rows are written every this many finished variants


def results_uri(out_uri: str) -> str:
    return storage.join(out_uri, RESULTS_NAME)


def absolute_serve_config(config: ServeConfig) -> ServeConfig:
    """``config`` with its local paths made absolute in this process: Serve replicas
    run in Ray's working directories, where a relative checkpoint or jobs folder
    names nothing."""
    import dataclasses

    absolute = storage.absolute_uri
    return dataclasses.replace(
        config,
        checkpoint=absolute(config.checkpoint),  # None (the default checkpoint) stays None
        models={name: absolute(uri) for name, uri in config.models.items()},
        jobs_uri=absolute(config.jobs_uri),
        fast=dataclasses.replace(config.fast, checkpoint=absolute(config.fast.checkpoint)),
        full=dataclasses.replace(config.full, checkpoint=absolute(config.full.checkpoint)),
        rank=dataclasses.replace(
            config.rank,
            table_uri=absolute(config.rank.table_uri),
            media_root=absolute(config.rank.media_root),
        ),
    )


@contextlib.contextmanager
def serving(
    serve_url: str | None, api_key: str | None, serve_config: str | dict | ServeConfig | None
) -> Iterator[tuple[str, str]]:
    """``(url, key)`` of a running app; starts one on a local Ray when no URL is given."""
    if serve_url:
        if not api_key:
            raise ValueError("an API key is needed with serve_url")
        yield serve_url, api_key
        return
    import ray
    from ray import serve

    from serve.app import run

    config = absolute_serve_config(serve_config_from(serve_config))
    key = api_key or (config.all_api_keys() or (secrets.token_urlsafe(24),))[0]
    if key not in config.all_api_keys():
        config.api_keys = (*config.api_keys, key)
    started_ray = not ray.is_initialized()
    url = run(config)
    try:
        yield url, key
    finally:
        serve.delete(config.app_name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()


def resolution_for(aspect: str, info: dict) -> str:
    native = info["resolutions"][0]
    width, height = (int(x) for x in native.split("x"))
    w, h = aspect_size(width, height, aspect)
    size = f"{w}x{h}"
    if size not in info["resolutions"]:
        raise ValueError(f"aspect ratio {aspect} ({size}) is not served: {info['resolutions']}")
    return size


def probe_output(uri: str) -> dict[str, Any]:
    import numpy as np

    from core.media import probe_media, read_audio, read_video

    info = probe_media(uri)
    frames, _ = read_video(uri)
    rms = None
    if info.has_audio:
        audio, _ = read_audio(uri)
        rms = float(np.sqrt(np.mean(np.square(audio)))) if audio.size else 0.0
    return {
        "probe_duration_s": float(info.duration_s),
        "probe_width": int(info.width),
        "probe_height": int(info.height),
        "probe_fps": float(info.fps),
        "probe_has_audio": bool(info.has_audio),
        "probe_audio_rms": rms,
        "probe_mean_luma": float(frames.mean()),
    }


def run_variant(
    client: DuetClient, variant: Variant, info: dict, out_uri: str, brief: str, price: float
) -> dict:
    """One variant end to end; every failure becomes the row's error, never an exception."""
    started = time.time()
    values: dict[str, Any] = {}
    try:
        video_uri = output_uri(storage.join(out_uri, "videos"), f"{variant.variant_id}.mp4")
        resolution = resolution_for(variant.aspect_ratio, info)
        values["resolution"] = resolution
        submitted = client.submit(variant.job(resolution))
        values["job_id"] = submitted.id
        final = client.wait(submitted.id, timeout_s=3600)
        values["compute_s"] = final.get("compute_s")
        if final["status"] != "succeeded":
            return result_row(variant, brief, status="failed", finished_at=time.time(),
                              error=final.get("error") or final["status"], **values)  # fmt: skip
        storage.write_bytes(video_uri, client.video(submitted.id))
        values.update(probe_output(video_uri))
        compute = float(final.get("compute_s") or 0.0)
        return result_row(
            variant, brief, status="succeeded", output_uri=video_uri,
            latency_s=round(time.time() - started, 3), cost_estimate=round(compute * price, 6),
            finished_at=time.time(), **values,
        )  # fmt: skip
    except Exception as err:  # recorded for this variant; the batch goes on
        message = str(getattr(err, "message", None) or err).strip() or repr(err)
        return result_row(variant, brief, status="failed", finished_at=time.time(),
                          error=f"{type(err).__name__}: {message[:500]}", **values)  # fmt: skip


@task(name="expand-brief", cache_policy=NO_CACHE)
def expand_task(brief_uri: str) -> tuple[str, list[Variant]]:
    return load_brief(brief_uri)


@task(name="run-variants", cache_policy=NO_CACHE)
def run_variants_task(
    variants: list[Variant], brief: str, out_uri: str, url: str, key: str,
    concurrency: int, price: float, previous: list[dict],
) -> list[dict]:  # fmt: skip
    logger = get_run_logger()
    rows = {r["variant_id"]: r for r in previous}
    lock = threading.Lock()
    finished = [0]
    with DuetClient(url, key) as client:
        info = client.info()

        def one(variant: Variant) -> None:
            row = run_variant(client, variant, info, out_uri, brief, price)
            with lock:
                rows[variant.variant_id] = row
                finished[0] += 1
                if finished[0] % WRITE_EVERY == 0:
                    write_results(results_uri(out_uri), list(rows.values()))
            if row["status"] == "failed":
                logger.warning("variant %s failed: %s", variant.variant_id, row["error"])

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            list(pool.map(one, variants))
    ordered = list(rows.values())
    write_results(results_uri(out_uri), ordered)
    return ordered


def _finished(previous: list[dict]) -> set[str]:
    done = set()
    for row in previous:
        if row.get("status") == "succeeded" and row.get("output_uri"):
            if storage.exists(row["output_uri"]):
                done.add(row["variant_id"])
    return done


@flow(name="adgen")
def adgen(
    brief_uri: str,
    out_uri: str,
    serve_url: str | None = None,
    api_key: str | None = None,
    serve_config: str | dict | None = None,
    concurrency: int = 4,
    price_per_compute_s: float | None = None,
) -> dict[str, Any]:
    """Expand the brief, generate every unfinished variant, write MP4s and results."""
    logger = get_run_logger()
    # The videos are written by Serve replicas, which run in Ray's working directories.
    brief_uri, out_uri = storage.absolute_uri(brief_uri), storage.absolute_uri(out_uri)
    if isinstance(serve_config, str):
        serve_config = storage.absolute_uri(serve_config)
    brief, variants = expand_task(brief_uri)
    previous = read_results(results_uri(out_uri))
    done = _finished(previous)
    todo = [v for v in variants if v.variant_id not in done]
    logger.info(
        "%s: %d variants, %d already made, %d to run", brief, len(variants), len(done), len(todo)
    )  # noqa: E501
    price = price_per_compute_s
    if price is None:
        price = serve_config_from(serve_config).price_per_compute_s
    started = time.time()
    rows = previous
    if todo:
        with serving(serve_url, api_key, serve_config) as (url, key):
            rows = run_variants_task(todo, brief, out_uri, url, key, concurrency, price, previous)
    ids = {v.variant_id for v in variants}
    mine = [r for r in rows if r["variant_id"] in ids]
    summary = {
        "brief": brief,
        "variants": len(variants),
        "skipped": len(done),
        "ran": len(todo),
        "succeeded": sum(1 for r in mine if r["status"] == "succeeded"),
        "failed": sum(1 for r in mine if r["status"] == "failed"),
        "results": results_uri(out_uri),
        "videos": storage.join(out_uri, "videos"),
        "wall_s": round(time.time() - started, 2),
    }
    logger.info("adgen: %s", summary)
    return summary
