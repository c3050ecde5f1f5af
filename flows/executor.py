"""The Ray side of curation, in one place: start or join Ray, run every source's
stage list as a Ray task, transcribe on a pool of speech actors, and stream each
finished source to a callback, never holding more than a bounded amount of work.

- Sources are submitted in order, at most ``max_in_flight`` at a time (default:
  twice the cluster's CPUs), so 100,000 sources cost the driver the same as 100:
  one URI list and a window of pending results.
- A source task that dies (worker OOM, node loss) is retried once by Ray, then
  recorded as quarantined at stage ``executor`` with the error's type: every
  input comes back exactly once.
- Speech: a source with clips and audio goes to a pool of actors as soon as its
  decode-bound pass is done. An actor call that fails is recorded for that source
  (its clips get ``speech_failed``), the actor is stopped (its WhisperX worker
  closed) and replaced.

The Prefect flow (``flows.curate``) only orders steps; it calls :func:`run_sources`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from core.ray_setup import forwarded_env, init_ray, quiet_ray_environment
from curation.pipeline import process_source_remote
from curation.records import QuarantineRecord, SourceResult, display_uri, source_id_of
from curation.transcribe import SpeechActor

# Starting or joining Ray (forwarded storage environment, explicit auth mode, no
# usage statistics) is shared with training: one way, in core.ray_setup.
__all__ = ["forwarded_env", "init_ray", "quiet_ray_environment", "run_sources", "shutdown_ray"]

log = logging.getLogger(__name__)


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


def default_in_flight() -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(2, 2 * cpus)


def _failed_result(uri: str, err: BaseException, fingerprint: str) -> dict[str, Any]:
    result = SourceResult(
        source_uri=display_uri(uri), source_id=source_id_of(uri), fingerprint=fingerprint
    )
    message = str(err).strip().splitlines()[-1][:500] if str(err).strip() else repr(err)
    result.quarantine = QuarantineRecord(
        uri=display_uri(uri),
        source_id=result.source_id,
        stage="executor",
        reason=message,
        error_type=type(err).__name__,
    ).to_dict()
    return result.to_dict()


class _SpeechPool:
    """Speech actors with at most ``2 x actors`` calls in flight; failed actors replaced."""

    def __init__(self, speech_config: dict[str, Any], workers: int, batch_size: int):
        import ray

        from curation.speech import SpeechStage

        resources = SpeechStage.resources
        self._cls = ray.remote(SpeechActor).options(**resources)
        self._args = (speech_config, batch_size, forwarded_env())
        self.idle = deque(self._cls.remote(*self._args) for _ in range(max(1, workers)))
        self.size = max(1, workers)
        self.busy: dict[Any, tuple[Any, str, dict[str, Any]]] = {}  # ref -> (actor, uri, result)

    def free(self) -> bool:
        return bool(self.idle)

    def submit(self, uri: str, result: dict[str, Any], out_uri: str) -> Any:
        actor = self.idle.popleft()
        ref = actor.run.remote(result, out_uri)
        self.busy[ref] = (actor, uri, result)
        return ref

    def complete(self, ref) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(uri, source result, speech payload); a failure becomes ``{"error": ...}``."""
        import ray

        actor, uri, result = self.busy.pop(ref)
        try:
            payload = ray.get(ref)
            self.idle.append(actor)
        except Exception as err:  # noqa: BLE001 - a failed transcription is recorded
            text = str(err).strip().splitlines()
            payload = {"error": f"{type(err).__name__}: {text[-1][:300] if text else ''}"}
            log.error("speech failed for %s: %s", uri, payload["error"])
            self._replace(actor)
        return uri, result, payload

    def _replace(self, actor) -> None:
        import ray

        try:
            ray.get(actor.close.remote(), timeout=30)
        except Exception:  # noqa: BLE001, S110 - the actor may be dead already
            pass
        ray.kill(actor)
        self.idle.append(self._cls.remote(*self._args))

    def close(self) -> None:
        import ray

        actors = list(self.idle) + [a for a, _, _ in self.busy.values()]
        for actor in actors:
            try:
                ray.get(actor.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001, S110 - best effort; killed below anyway
                pass
            ray.kill(actor)


def run_sources(
    uris: list[str],
    out_uri: str,
    config: dict[str, Any],
    fingerprint: str,
    on_done: Callable[[str, dict[str, Any], dict[str, Any] | None, bool], None],
    cpus_per_source: float = 1.0,
    max_in_flight: int | None = None,
    speech: bool = False,
    speech_config: dict[str, Any] | None = None,
    speech_workers: int = 1,
    speech_batch_size: int = 8,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, int]:
    """Run every source; call ``on_done(uri, result, speech_payload, skipped)`` once per
    input as each finishes. Returns counts (ran, skipped, executor failures)."""
    import ray

    remote = ray.remote(process_source_remote).options(
        num_cpus=cpus_per_source,
        max_retries=1,  # a worker process that died (OOM, node loss) is retried once
    )
    env = forwarded_env()
    limit = max_in_flight or default_in_flight()
    todo = deque(uris)
    pending: dict[Any, str] = {}
    pool = _SpeechPool(speech_config or {}, speech_workers, speech_batch_size) if speech else None
    waiting_speech: deque[tuple[str, dict[str, Any], bool]] = deque()
    skipped_of: dict[str, bool] = {}
    counts = {"ran": 0, "skipped": 0, "executor_failures": 0, "speech_failures": 0}
    done = 0
    total = len(uris)

    def finish(uri: str, result: dict[str, Any], payload, skipped: bool) -> None:
        nonlocal done
        on_done(uri, result, payload, skipped)
        done += 1
        if on_progress:
            on_progress("sources", done, total)

    try:
        while todo or pending or waiting_speech or (pool and pool.busy):
            # Finished sources waiting for a speech actor count against the window
            # too: slow speech holds the decode-bound work back, not driver memory.
            while todo and len(pending) + len(waiting_speech) < limit:
                uri = todo.popleft()
                pending[remote.remote(uri, out_uri, config, env)] = uri
            while pool and waiting_speech and pool.free():
                uri, result, skipped = waiting_speech.popleft()
                skipped_of[uri] = skipped
                pool.submit(uri, result, out_uri)
            refs = list(pending) + (list(pool.busy) if pool else [])
            if not refs:
                continue
            ready, _ = ray.wait(refs, num_returns=1)
            ref = ready[0]
            if pool and ref in pool.busy:
                uri, result, payload = pool.complete(ref)
                counts["speech_failures"] += bool(payload.get("error"))
                finish(uri, result, payload, skipped_of.pop(uri))
                continue
            uri = pending.pop(ref)
            try:
                reply = ray.get(ref)
                result, skipped = reply["result"], reply["skipped"]
            except Exception as err:  # noqa: BLE001 - one source's failure must not stop the batch
                result, skipped = _failed_result(uri, err, fingerprint), False
                counts["executor_failures"] += 1
                log.error("source %s failed: %s", uri, result["quarantine"]["reason"])
            counts["skipped" if skipped else "ran"] += 1
            needs_speech = pool is not None and any(
                c.get("has_audio", True) for c in result["clips"]
            )
            if needs_speech:
                waiting_speech.append((uri, result, skipped))
            else:
                finish(uri, result, None, skipped)
    finally:
        if pool is not None:
            pool.close()
    return counts
