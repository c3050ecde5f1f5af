"""The Ray Serve application for real: ingress + fast + full on a local Ray.

One app (random ``tiny`` weights, 2-step sampling, fractional CPUs) is started for
the module. Checked: composition over HTTP with dynamic batching, the served page
and OpenAPI; a killed model replica mid-request (the job is retried and succeeds on
its second attempt); a killed ingress (jobs in storage carry on); and autoscaling of
``fast`` from 1 replica up and back down under bounded load from a second process,
with every accepted job counted by its final state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from serve.client import DuetClient
from serve.config import serve_config_from
from serve.jobs import JobRecord, JobStore, new_job_id

pytestmark = pytest.mark.slow

KEY = "ray-test-key"


@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory, listen_port):
    import ray
    from ray import serve

    from serve.app import run

    jobs = str(tmp_path_factory.mktemp("serve_ray") / "jobs")
    config = serve_config_from(
        {
            "checkpoint": tiny_checkpoint,
            "jobs_uri": jobs,
            "api_keys": [KEY],
            "port": listen_port(),
            "stale_after_s": 20.0,
            "ingress_num_cpus": 0.05,
            "fast": {
                "steps": 2, "sampler": "euler", "num_cpus": 0.25,
                "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1.0,
                "upscale_delay_s": 1.0, "downscale_delay_s": 5.0,
                "look_back_period_s": 2.0,
                "max_ongoing_requests": 2, "max_queued_requests": 8,
                "max_batch_size": 4, "batch_wait_timeout_s": 0.2,
                # A replica the autoscaler removes finishes its jobs first: with a
                # 2 s grace, the kill test's retry landed on a replica scaled down a
                # second later and was force-killed too (fresh clone, 2026-12-04).
                "health_check_period_s": 2.0, "graceful_shutdown_timeout_s": 60.0,
            },
            "full": {"steps": 2, "sampler": "euler", "num_cpus": 0.25, "min_replicas": 1,
                     "max_replicas": 1},
        }
    )  # fmt: skip
    url = run(config, num_cpus=2)
    client = DuetClient(url, KEY)
    try:
        yield url, client, jobs
    finally:
        client.close()
        serve.shutdown()
        ray.shutdown()


def _replicas(deployment: str, state: str = "RUNNING") -> int:
    from ray import serve

    status = serve.status().applications["duet"].deployments[deployment]
    return int(status.replica_states.get(state, 0))


def test_composed_app_batches_jobs_and_serves_page_and_schema(app):
    url, client, _ = app
    assert client.ready()
    assert "Duet" in client.http.get("").text
    assert "/v1/jobs" in client.http.get("openapi.json").json()["paths"]
    fast = [
        client.submit({"prompt": f"a ball {i}", "seed": i, "duration_s": 1.0}).id for i in range(6)
    ]  # noqa: E501
    full = client.submit({"prompt": "a ball", "quality": "full", "duration_s": 1.0}).id
    finals = [client.wait(j, timeout_s=300) for j in [*fast, full]]
    assert [f["status"] for f in finals] == ["succeeded"] * 7, finals
    batch_sizes = [client.metadata(j)["batch_size"] for j in fast]
    assert max(batch_sizes) > 1, batch_sizes  # concurrent compatible jobs shared a batch
    assert client.metadata(full)["quality"] == "full"


def test_killing_a_model_replica_mid_request_retries_the_job(app):
    import ray

    _, client, jobs = app
    store = JobStore(jobs)
    job_id = client.submit({"prompt": "a long clip", "duration_s": 10.0, "seed": 7}).id
    deadline = time.time() + 300
    record = store.load(job_id)
    while not (record.status == "running" and record.progress > 0):
        assert time.time() < deadline, record
        time.sleep(0.2)
        record = store.load(job_id)
    ray.kill(ray.get_actor(record.replica, namespace="serve"), no_restart=True)
    final = client.wait(job_id, timeout_s=400)
    # Retried on the replica Serve starts in its place (max_attempts is 2): a dead
    # replica costs one attempt, never the job. (Failing after every attempt died is
    # tests/test_serve_dispatch.py's.)
    assert final["status"] == "succeeded", (final.get("error"), final)
    assert final["attempts"] == 2, final


def test_jobs_outlive_a_killed_ingress(app):
    import ray
    from ray import serve

    _, client, jobs = app
    before = client.submit({"prompt": "before the ingress dies", "duration_s": 1.0}).id
    # Accepted by an ingress that died before dispatching it.
    orphan = JobRecord(
        id=new_job_id(), spec={"prompt": "orphan", "duration_s": 1.0}, quality="fast"
    )  # noqa: E501
    JobStore(jobs).save(orphan)
    ingress = [name for name in _actor_names() if name.startswith("SERVE_REPLICA::duet#ingress#")]
    assert ingress
    ray.kill(ray.get_actor(ingress[0], namespace="serve"), no_restart=True)
    deadline = time.time() + 300
    while not client.ready():
        assert time.time() < deadline
        time.sleep(1.0)
    assert serve.status().applications["duet"].deployments["ingress"].status == "HEALTHY"
    for job_id in (before, orphan.id):
        assert client.wait(job_id, timeout_s=300)["status"] == "succeeded"


def _actor_names() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]


def test_fast_scales_up_under_load_and_back_down(app, tmp_path):
    url, client, _ = app
    deadline = time.time() + 120
    while _replicas("fast") != 1:  # earlier tests may have left it scaled up
        assert time.time() < deadline, _replicas("fast")
        time.sleep(1.0)
    out, stop = tmp_path / "load.json", tmp_path / "stop"
    # Load runs until a second replica has served for 5 s (replicas start slowly
    # on a busy 2-core machine), at most 300 s; then it stops and the scale-down is watched.
    load = subprocess.Popen(
        [sys.executable, "-m", "serve.loadgen", url, "--key", KEY, "--concurrency", "6",
         "--seconds", "300", "--duration", "1.0", "--out", str(out), "--stop-file", str(stop)],
    )  # fmt: skip
    timeline = []  # (seconds, running, starting)
    started = time.time()
    up_since = None
    while load.poll() is None:
        now = round(time.time() - started, 1)
        timeline.append((now, _replicas("fast"), _replicas("fast", "STARTING")))
        if timeline[-1][1] >= 2 and up_since is None:
            up_since = now
        if up_since is not None and now - up_since > 5:
            stop.touch()
        assert now < 900, timeline[-5:]
        time.sleep(1.0)
    assert load.returncode == 0
    load_done = time.time() - started
    while timeline[-1][1] > 1 and time.time() - started < load_done + 120:
        time.sleep(1.0)
        now = round(time.time() - started, 1)
        timeline.append((now, _replicas("fast"), _replicas("fast", "STARTING")))
    summary = json.loads(out.read_text())
    peak = max(n for _, n, _ in timeline)
    changes = [p for i, p in enumerate(timeline) if i == 0 or p[1:] != timeline[i - 1][1:]]
    print(json.dumps({"timeline": changes, "load_stopped_s": round(load_done, 1),
                      **{k: v for k, v in summary.items() if k != "jobs"}}))  # fmt: skip
    assert peak >= 2, timeline  # scaled up under load
    assert timeline[-1][1] == 1, timeline  # and back down after it stopped
    # Every accepted job finished or failed with a reason; none lost.
    assert summary["accepted"] > 0
    assert set(summary["by_status"]) <= {"succeeded", "failed"}, summary["by_status"]
    assert all(summary["failed_reasons"]), summary["failed_reasons"]
