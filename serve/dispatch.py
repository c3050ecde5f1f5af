"""From accepted job to finished job: bounded admission, retries, recovery.

The :class:`Dispatcher` is what the ingress runs. It admits a job only while fewer
than ``limits.max_pending_jobs`` of that quality are unfinished in this ingress
(past that, 429 with Retry-After: the queue never grows without bound), hands the
job to a backend (the Serve model deployments, or an in-process worker), and:

- waits and retries when the backend is itself full (Serve's ``max_queued_requests``
  back-pressure): the job stays queued, no attempt is spent;
- retries a job whose replica died mid-request, up to ``max_attempts``, then fails
  it with the reason: a job is never silently lost;
- on start-up and every few seconds, picks up jobs in storage that nobody drives (a
  restarted ingress): queued ones are dispatched, running ones whose heartbeat went
  stale are retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from serve.config import QUALITIES, ServeConfig
from serve.guards import GuardError
from serve.jobs import JobRecord, JobStore

log = logging.getLogger(__name__)


class ReplicaLost(Exception):
    """The replica running a job died or became unreachable mid-request."""


class BackendFull(Exception):
    """The backend refused the job for now (its bounded queue is full)."""

    def __init__(self, retry_after_s: float, message: str = ""):
        super().__init__(message or f"backend full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Backend(Protocol):
    async def run(self, job_id: str, quality: str, model: str) -> dict: ...

    async def ready(self) -> dict[str, bool]: ...


@dataclass
class DispatchStats:
    accepted: int = 0
    rejected_full: int = 0
    retried_replica_lost: int = 0
    waited_backend_full: int = 0
    recovered: int = 0


class Dispatcher:
    def __init__(self, config: ServeConfig, store: JobStore, backend: Backend):
        self.config = config
        self.store = store
        self.backend = backend
        self.pending: dict[str, set[str]] = {q: set() for q in QUALITIES}
        self.tasks: set[asyncio.Task] = set()
        self.stats = DispatchStats()
        self._sweeper: asyncio.Task | None = None

    # -- admission ---------------------------------------------------------------
    def admit(self, quality: str) -> None:
        """Raise 429 (Retry-After) when this quality's bounded queue is full."""
        limit = self.config.limits.max_pending_jobs
        if len(self.pending[quality]) >= limit:
            self.stats.rejected_full += 1
            retry = self.config.limits.retry_after_s
            raise GuardError(
                429,
                f"the {quality} queue is full ({limit} unfinished jobs); retry in {retry} s",
                {"Retry-After": str(retry)},
            )

    def start(self, record: JobRecord) -> None:
        self.stats.accepted += 1
        self._spawn(record.id, record.quality, record.model)

    def _spawn(self, job_id: str, quality: str, model: str) -> None:
        self.pending[quality].add(job_id)
        task = asyncio.get_running_loop().create_task(self._drive(job_id, quality, model))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- one job -----------------------------------------------------------------
    async def _drive(self, job_id: str, quality: str, model: str) -> None:
        try:
            await self._drive_inner(job_id, quality, model)
        except Exception as err:  # never leave a job without a terminal state
            log.exception("dispatching %s failed", job_id)
            await asyncio.to_thread(self._fail, job_id, f"dispatch error: {err}")
        finally:
            self.pending[quality].discard(job_id)

    async def _drive_inner(self, job_id: str, quality: str, model: str) -> None:
        while True:
            record = await asyncio.to_thread(self.store.load, job_id)
            if record is None or record.terminal:
                return
            if record.attempts >= self.config.max_attempts:
                await asyncio.to_thread(
                    self._fail, job_id, f"gave up after {record.attempts} attempt(s)"
                )
                return
            record.attempts += 1
            record.status = "queued"
            await asyncio.to_thread(self.store.save, record)
            try:
                await self.backend.run(job_id, quality, model)
            except BackendFull as full:
                self.stats.waited_backend_full += 1
                record.attempts -= 1  # not started: no attempt spent
                await asyncio.to_thread(self.store.save, record)
                await asyncio.sleep(max(0.2, full.retry_after_s))
                continue
            except ReplicaLost as lost:
                self.stats.retried_replica_lost += 1
                log.warning("job %s: replica lost on attempt %d: %s", job_id, record.attempts, lost)
                if record.attempts >= self.config.max_attempts:
                    await asyncio.to_thread(
                        self._fail,
                        job_id,
                        f"the replica running it died on each of {record.attempts} attempt(s): "
                        f"{lost}",
                    )
                    return
                continue
            # The worker wrote the outcome; a job another replica is running is
            # watched until it ends or its heartbeat goes stale.
            if await self._watch(job_id):
                return

    async def _watch(self, job_id: str) -> bool:
        """True once the job is terminal; False when it went stale (retry it)."""
        while True:
            record = await asyncio.to_thread(self.store.load, job_id)
            if record is None or record.terminal:
                return True
            if record.status == "queued":
                return False
            beat = record.heartbeat_at or record.started_at or record.updated_at
            if time.time() - beat > self.config.stale_after_s:
                return False
            await asyncio.sleep(1.0)

    def _fail(self, job_id: str, reason: str) -> None:
        record = self.store.load(job_id)
        if record is None or record.terminal:
            return
        record.status, record.error, record.finished_at = "failed", reason, time.time()
        self.store.save(record)

    # -- recovery ----------------------------------------------------------------
    def start_sweeper(self, every_s: float = 5.0) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(every_s))

    async def _sweep_forever(self, every_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("job sweep failed")
            await asyncio.sleep(every_s)

    async def sweep(self) -> int:
        """Dispatch stored jobs nobody drives; returns how many were picked up."""
        picked = 0
        for record in await asyncio.to_thread(self.store.unfinished):
            if record.id in self.pending.get(record.quality, set()):
                continue
            if record.quality not in QUALITIES:
                await asyncio.to_thread(self._fail, record.id, f"unknown quality {record.quality}")
                continue
            picked += 1
            self.stats.recovered += 1
            self.pending[record.quality].add(record.id)
            task = asyncio.get_running_loop().create_task(
                self._recover(record.id, record.quality, record.model)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return picked

    async def _recover(self, job_id: str, quality: str, model: str) -> None:
        try:
            # A running job (its replica outlived the ingress that dispatched it) is
            # watched; it is dispatched again only if its heartbeat goes stale.
            record = await asyncio.to_thread(self.store.load, job_id)
            if record is not None and record.status == "running":
                if await self._watch(job_id):
                    return
                log.warning("job %s: heartbeat stale, dispatching again", job_id)
            await self._drive_inner(job_id, quality, model)
        except Exception as err:
            log.exception("recovering %s failed", job_id)
            await asyncio.to_thread(self._fail, job_id, f"dispatch error: {err}")
        finally:
            self.pending[quality].discard(job_id)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self.tasks):
            task.cancel()
