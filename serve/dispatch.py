"""From accepted job to finished job: bounded admission, retries, recovery.

The :class:`Dispatcher` is what the ingress runs. It admits a job only while fewer
than ``limits.max_pending_jobs`` of that deployment are unfinished in this ingress
and its tenant is under its quota (running + queued jobs; past either, 429 with
Retry-After: the queue never grows without bound), hands the job to a backend (the
Serve model deployments, or an in-process worker) while its tenant has fewer than
its ``max running`` jobs there, and:

- waits and retries when the backend is itself full (Serve's ``max_queued_requests``
  back-pressure): the job stays queued, no attempt is spent;
- retries a job whose replica died mid-request, up to ``max_attempts``, then fails
  it with the reason: a job is never silently lost. A request that reached a dead
  replica before the job started (the router had not yet dropped it) spends no
  attempt; it is retried after a back-off, at most ``MAX_UNSTARTED_LOSSES`` times;
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

from serve.config import DEFAULT_TENANT, QUALITIES, ServeConfig
from serve.guards import GuardError
from serve.jobs import JobRecord, JobStore

log = logging.getLogger(__name__)

# Requests a job may lose to dead replicas before any of them started it. Past this the
# deployment is not coming back (its replicas die at start-up) and the job fails.
MAX_UNSTARTED_LOSSES = 8


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
    rejected_tenant_quota: int = 0
    retried_replica_lost: int = 0
    waited_backend_full: int = 0
    recovered: int = 0


class Dispatcher:
    def __init__(self, config: ServeConfig, store: JobStore, backend: Backend):
        self.config = config
        self.store = store
        self.backend = backend
        # Unfinished jobs driven here, by deployment and by tenant.
        self.pending: dict[str, set[str]] = {q: set() for q in QUALITIES}
        self.by_tenant: dict[str, set[str]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.tasks: set[asyncio.Task] = set()
        self.stats = DispatchStats()
        self.watch_every_s = 1.0
        # After a lost replica, time for Serve to drop it from the router's set (doubled
        # on each loss that never started the job, up to 8x).
        self.lost_backoff_s = 1.0
        self._unstarted_losses: dict[str, int] = {}
        self._sweeper: asyncio.Task | None = None

    # -- admission ---------------------------------------------------------------
    def admit(self, quality: str, tenant: str = DEFAULT_TENANT) -> None:
        """Raise 429 (Retry-After) when the deployment's bounded queue is full or the
        tenant has its quota of unfinished jobs (running + queued) here."""
        retry = self.config.limits.retry_after_s
        limit = self.config.limits.max_pending_jobs
        if len(self.pending[quality]) >= limit:
            self.stats.rejected_full += 1
            raise GuardError(
                429,
                f"the {quality} queue is full ({limit} unfinished jobs); retry in {retry} s",
                {"Retry-After": str(retry)},
            )
        running, queued = self.config.tenant_quota(tenant)
        have = len(self.by_tenant.get(tenant, ()))
        if have >= running + queued:
            self.stats.rejected_tenant_quota += 1
            raise GuardError(
                429,
                f"tenant {tenant!r} has {have} unfinished jobs, its quota ({running} running "
                f"+ {queued} queued); retry in {retry} s",
                {"Retry-After": str(retry)},
            )

    def start(self, record: JobRecord) -> None:
        self.stats.accepted += 1
        self._spawn(record, self._drive)

    def _spawn(self, record: JobRecord, drive) -> None:
        deployment, tenant = record.deployment, record.tenant
        self.pending[deployment].add(record.id)
        self.by_tenant.setdefault(tenant, set()).add(record.id)

        async def run() -> None:
            try:
                await drive(record.id, deployment, record.model, tenant)
            except Exception as err:  # never leave a job without a terminal state
                log.exception("dispatching %s failed", record.id)
                await asyncio.to_thread(self._fail, record.id, f"dispatch error: {err}")
            finally:
                self._unstarted_losses.pop(record.id, None)
                self.pending[deployment].discard(record.id)
                self.by_tenant.get(tenant, set()).discard(record.id)

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _slot(self, tenant: str) -> asyncio.Semaphore:
        """The tenant's running-jobs slots: a job waits here (queued) for one."""
        if tenant not in self._slots:
            self._slots[tenant] = asyncio.Semaphore(self.config.tenant_quota(tenant)[0])
        return self._slots[tenant]

    # -- one job -----------------------------------------------------------------
    async def _drive(self, job_id: str, deployment: str, model: str, tenant: str) -> None:
        while True:
            async with self._slot(tenant):
                wait = await self._attempt(job_id, deployment, model)
            if wait is None:
                return
            if wait > 0:
                await asyncio.sleep(wait)

    async def _attempt(self, job_id: str, deployment: str, model: str) -> float | None:
        """One try at the job: None once it is settled, else seconds to wait first."""
        record = await asyncio.to_thread(self.store.load, job_id)
        if record is None or record.terminal:
            return None
        if record.attempts >= self.config.max_attempts:
            await asyncio.to_thread(
                self._fail, job_id, f"gave up after {record.attempts} attempt(s)"
            )
            return None
        record.attempts += 1
        record.status = "queued"
        await asyncio.to_thread(self.store.save, record)
        try:
            await self.backend.run(job_id, deployment, model)
        except BackendFull as full:
            self.stats.waited_backend_full += 1
            record.attempts -= 1  # not started: no attempt spent
            await asyncio.to_thread(self.store.save, record)
            return max(0.2, full.retry_after_s)
        except ReplicaLost as lost:
            return await self._lost(job_id, lost)
        # The worker wrote the outcome; a job another replica is running is watched
        # until it ends or its heartbeat goes stale (then it is tried again).
        return None if await self._watch(job_id) else 0.0

    async def _lost(self, job_id: str, lost: ReplicaLost) -> float | None:
        """The replica died: retry after a back-off, or fail once the job's attempts
        (or, for a job no replica ever started, its unstarted losses) are spent."""
        self.stats.retried_replica_lost += 1
        record = await asyncio.to_thread(self.store.load, job_id)
        if record is None or record.terminal:
            return None
        if record.status == "queued":  # no worker started it: the request hit a dead replica
            unstarted = self._unstarted_losses.get(job_id, 0) + 1
            self._unstarted_losses[job_id] = unstarted
            log.warning("job %s: request lost before it started (%d): %s", job_id, unstarted, lost)
            if unstarted > MAX_UNSTARTED_LOSSES:
                await asyncio.to_thread(
                    self._fail,
                    job_id,
                    f"{unstarted} requests for it reached dead replicas before any started it: {lost}",
                )
                return None
            record.attempts -= 1
            await asyncio.to_thread(self.store.save, record)
            return self.lost_backoff_s * min(2 ** (unstarted - 1), 8)
        log.warning("job %s: replica lost on attempt %d: %s", job_id, record.attempts, lost)
        if record.attempts >= self.config.max_attempts:
            await asyncio.to_thread(
                self._fail,
                job_id,
                f"the replica running it died on each of {record.attempts} attempt(s): {lost}",
            )
            return None
        return self.lost_backoff_s

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
            await asyncio.sleep(self.watch_every_s)

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
            if any(record.id in ids for ids in self.pending.values()):
                continue
            if record.quality not in QUALITIES:
                await asyncio.to_thread(self._fail, record.id, f"unknown quality {record.quality}")
                continue
            picked += 1
            self.stats.recovered += 1
            self._spawn(record, self._recover)
        return picked

    async def _recover(self, job_id: str, deployment: str, model: str, tenant: str) -> None:
        # A running job (its replica outlived the ingress that dispatched it) is
        # watched; it is dispatched again only if its heartbeat goes stale.
        record = await asyncio.to_thread(self.store.load, job_id)
        if record is not None and record.status == "running":
            if await self._watch(job_id):
                return
            log.warning("job %s: heartbeat stale, dispatching again", job_id)
        await self._drive(job_id, deployment, model, tenant)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self.tasks):
            task.cancel()
