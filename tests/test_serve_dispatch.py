"""The dispatcher's recovery paths, made deterministic with a scripted backend.

Each job's backend calls follow a script: ``lost`` (the replica died mid-request,
after marking the job running as a worker does), ``unstarted`` (the request reached a
dead replica: nothing started), ``full`` (back-pressure, nothing started), ``ok``
(the job runs and succeeds). Jobs live in a real store on disk.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.config import serve_config_from
from serve.dispatch import MAX_UNSTARTED_LOSSES, BackendFull, Dispatcher, ReplicaLost
from serve.guards import GuardError
from serve.jobs import JobRecord, JobStore, new_job_id


class _Scripted:
    def __init__(self, store: JobStore, script: dict[str, list[str]]):
        self.store = store
        self.script = script
        self.calls: list[tuple[str, str]] = []  # (job id, what happened)

    async def run(self, job_id: str, quality: str, model: str) -> dict:
        step = self.script[job_id][min(len(self.calls_for(job_id)), len(self.script[job_id]) - 1)]
        self.calls.append((job_id, step))
        record = self.store.load(job_id)
        if step == "full":
            raise BackendFull(0.0)
        if step == "unstarted":
            raise ReplicaLost("ActorDiedError: the actor died before this task ran")
        record.status, record.started_at = "running", time.time()
        record.heartbeat_at, record.replica = time.time(), f"replica-{len(self.calls)}"
        self.store.save(record)
        if step == "lost":
            raise ReplicaLost("ActorDiedError: the replica's process exited")
        record.status, record.finished_at, record.progress = "succeeded", time.time(), 1.0
        self.store.save(record)
        return {"id": job_id, "status": "succeeded", "error": None}

    def calls_for(self, job_id: str) -> list[str]:
        return [step for j, step in self.calls if j == job_id]

    async def ready(self) -> dict[str, bool]:
        return {"fast": True, "full": True}


def _setup(tmp_path, script: dict[str, list[str]], **config):
    store = JobStore(str(tmp_path / "jobs"))
    cfg = serve_config_from({"jobs_uri": store.root, "api_keys": ["k"], **config})
    backend = _Scripted(store, script)
    dispatcher = Dispatcher(cfg, store, backend)
    dispatcher.watch_every_s = 0.05
    dispatcher.lost_backoff_s = 0.01
    return store, backend, dispatcher


def _job(store: JobStore, **fields) -> JobRecord:
    return store.save(JobRecord(id=new_job_id(), spec={"prompt": "a"}, quality="fast", **fields))


async def _settle(dispatcher: Dispatcher, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while dispatcher.tasks:
        assert time.monotonic() < deadline, "the dispatcher did not settle"
        await asyncio.sleep(0.02)


def test_a_job_whose_replica_dies_succeeds_on_its_second_attempt(tmp_path):
    store, backend, dispatcher = _setup(tmp_path, {}, max_attempts=2)
    record = _job(store)
    backend.script[record.id] = ["lost", "ok"]

    async def main():
        dispatcher.start(record)
        await _settle(dispatcher)

    asyncio.run(main())
    final = store.load(record.id)
    assert final.status == "succeeded" and final.attempts == 2, final
    assert backend.calls_for(record.id) == ["lost", "ok"]
    assert dispatcher.stats.retried_replica_lost == 1


def test_a_job_whose_replica_dies_every_time_fails_with_the_reason(tmp_path):
    store, backend, dispatcher = _setup(tmp_path, {}, max_attempts=3)
    record = _job(store)
    backend.script[record.id] = ["lost"]

    async def main():
        dispatcher.start(record)
        await _settle(dispatcher)

    asyncio.run(main())
    final = store.load(record.id)
    assert final.status == "failed" and final.attempts == 3, final
    assert "died on each of 3 attempt(s)" in final.error and "ActorDiedError" in final.error
    assert backend.calls_for(record.id) == ["lost"] * 3
    assert not any(dispatcher.pending.values())  # nothing left counted as pending


def test_a_request_lost_before_the_job_started_spends_no_attempt(tmp_path):
    # The retry after a replica died went to the same dead replica (the router had not
    # dropped it yet): with max_attempts=2 that must not fail the job.
    store, backend, dispatcher = _setup(tmp_path, {}, max_attempts=2)
    record = _job(store)
    backend.script[record.id] = ["lost", "unstarted", "unstarted", "ok"]

    async def main():
        dispatcher.start(record)
        await _settle(dispatcher)

    asyncio.run(main())
    final = store.load(record.id)
    assert final.status == "succeeded" and final.attempts == 2, final
    assert backend.calls_for(record.id) == ["lost", "unstarted", "unstarted", "ok"]
    assert not dispatcher._unstarted_losses  # forgotten once the job settled


def test_a_job_no_replica_ever_starts_fails_with_the_reason(tmp_path):
    store, backend, dispatcher = _setup(tmp_path, {}, max_attempts=2)
    record = _job(store)
    backend.script[record.id] = ["unstarted"]

    async def main():
        dispatcher.start(record)
        await _settle(dispatcher)

    asyncio.run(main())
    final = store.load(record.id)
    assert final.status == "failed", final
    assert "reached dead replicas before any started it" in final.error, final.error
    assert backend.calls_for(record.id) == ["unstarted"] * (MAX_UNSTARTED_LOSSES + 1)


def test_back_pressure_waits_without_spending_an_attempt(tmp_path):
    store, backend, dispatcher = _setup(tmp_path, {}, max_attempts=1)
    record = _job(store)
    backend.script[record.id] = ["full", "full", "ok"]

    async def main():
        dispatcher.start(record)
        await _settle(dispatcher)

    asyncio.run(main())
    final = store.load(record.id)
    # max_attempts=1: had back-pressure cost an attempt, the job would have failed.
    assert final.status == "succeeded" and final.attempts == 1, final
    assert dispatcher.stats.waited_backend_full == 2


def test_a_full_queue_is_refused_at_admission(tmp_path):
    store, backend, dispatcher = _setup(tmp_path, {}, limits={"max_pending_jobs": 1})
    record = _job(store)
    backend.script[record.id] = ["full"]  # stays pending: the backend never takes it

    async def main():
        dispatcher.start(record)
        with pytest.raises(GuardError) as err:
            dispatcher.admit("fast")
        dispatcher.admit("full")  # the other deployment's queue is its own
        await dispatcher.close()
        return err.value

    err = asyncio.run(main())
    assert err.status == 429 and err.headers["Retry-After"] == "5"


def test_a_running_job_with_a_stale_heartbeat_is_dispatched_again(tmp_path):
    """Left running by a replica that died with the ingress that drove it: the sweep
    of a new ingress finds it, sees the heartbeat stale, and runs it again."""
    store, backend, dispatcher = _setup(tmp_path, {}, stale_after_s=5.0, max_attempts=2)
    old = time.time() - 60
    stale = _job(store, status="running", attempts=1, started_at=old, heartbeat_at=old,
                 replica="dead-replica")  # fmt: skip
    queued = _job(store)  # accepted, never dispatched
    backend.script.update({stale.id: ["ok"], queued.id: ["ok"]})

    async def main():
        assert await dispatcher.sweep() == 2
        await _settle(dispatcher)

    asyncio.run(main())
    final = store.load(stale.id)
    assert final.status == "succeeded" and final.attempts == 2, final
    assert store.load(queued.id).status == "succeeded"
    assert dispatcher.stats.recovered == 2


def test_a_running_job_with_a_fresh_heartbeat_is_left_to_its_replica(tmp_path):
    store, backend, dispatcher = _setup(tmp_path, {}, stale_after_s=0.5)
    now = time.time()
    alive = _job(store, status="running", attempts=1, started_at=now, heartbeat_at=now,
                 replica="live-replica")  # fmt: skip
    backend.script[alive.id] = ["ok"]

    async def replica_beats_then_finishes():
        for _ in range(15):  # 1.5 s: three times the stale limit
            await asyncio.sleep(0.1)
            record = store.load(alive.id)
            record.heartbeat_at = time.time()
            store.save(record)
        record = store.load(alive.id)
        record.status, record.finished_at = "succeeded", time.time()
        store.save(record)

    async def main():
        beating = asyncio.create_task(replica_beats_then_finishes())
        await dispatcher.sweep()
        await _settle(dispatcher)
        await beating

    asyncio.run(main())
    assert backend.calls == []  # never dispatched twice
    assert store.load(alive.id).attempts == 1


class _RaisingHandle:
    """A deployment handle whose ``run.remote`` raises ``error``."""

    def __init__(self, error: BaseException):
        self.error = error
        self.run = self

    def options(self, **_):
        return self

    def remote(self, job_id: str):
        async def fail():
            raise self.error

        return fail()


def test_ray_errors_map_to_lost_replica_back_pressure_or_the_replicas_own_error():
    from ray.exceptions import (
        ActorDiedError,
        ActorUnavailableError,
        RayTaskError,
        WorkerCrashedError,
    )
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

    from serve.app import ServeBackend

    cfg = serve_config_from({"jobs_uri": "/tmp/unused", "api_keys": ["k"]})

    def outcome(error: BaseException) -> type:
        backend = ServeBackend({"fast": _RaisingHandle(error)}, cfg)
        try:
            asyncio.run(backend.run("job", "fast", "default"))
        except Exception as err:
            return type(err)
        raise AssertionError("no error")

    try:
        raise ValueError("bad spec")
    except ValueError as app_error:
        own = RayTaskError("run", "traceback", app_error)
    died = ActorDiedError()
    lost = [
        died,
        ActorUnavailableError("unreachable", b"a" * 16),
        WorkerCrashedError(),
        RayTaskError("run", "traceback", died),
        ReplicaUnavailableError("replica-1"),
    ]
    assert [outcome(e) for e in lost] == [ReplicaLost] * len(lost)
    assert outcome(BackPressureError(num_queued_requests=9, max_queued_requests=8)) is BackendFull
    assert outcome(own) is not ReplicaLost  # the replica's own error is not retried as lost
