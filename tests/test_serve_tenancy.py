"""Tenancy: each key belongs to a tenant; a tenant's jobs, results and outputs are
invisible to every other tenant (404, as if they did not exist) but not to an admin;
per-tenant quotas on running and queued jobs answer 429 with Retry-After.

Reads, downloads and cancels run on the in-process app with a random ``tiny``
checkpoint (real jobs, real MP4s); the quota test uses a backend that holds each job
until the test lets it go, so "running" and "queued" are states the test controls.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from serve.api import build_api
from serve.config import Principal, serve_config_from
from serve.jobs import JobRecord, JobStore, new_job_id
from serve.local import build_local_app

KEY_A, KEY_B, KEY_OPS, KEY_OLD = "key-brand-a", "key-brand-b", "key-ops", "key-bare"
A, B, OPS, OLD = ({"X-API-Key": k} for k in (KEY_A, KEY_B, KEY_OPS, KEY_OLD))


def _tenants(**quota) -> dict:
    return {
        "brand-a": {"api_keys": [KEY_A], **quota},
        "brand-b": {"api_keys": [KEY_B]},
        "ops": {"api_keys": [KEY_OPS], "admin": True},
    }


# -- keys and tenants in the config -------------------------------------------------


def test_keys_map_to_tenants_from_config_and_environment(monkeypatch):
    monkeypatch.setenv("DUET_API_KEYS", "env-bare, brand-c:env-c ,ops2:env-ops:admin")
    config = serve_config_from({"api_keys": [KEY_OLD], "tenants": _tenants()})
    who = config.principals()
    assert who[KEY_OLD] == Principal("default")  # the old format: one shared tenant
    assert who["env-bare"] == Principal("default")
    assert who[KEY_A] == Principal("brand-a") and who[KEY_B] == Principal("brand-b")
    assert who[KEY_OPS] == Principal("ops", admin=True)
    assert who["env-c"] == Principal("brand-c")
    assert who["env-ops"] == Principal("ops2", admin=True)
    # all_api_keys (what the CLI and the batch flow use) still lists every key.
    assert set(config.all_api_keys()) == set(who)


@pytest.mark.parametrize(
    ("env", "tenants", "needle"),
    [
        ("", {"a": {"api_keys": ["same"]}, "b": {"api_keys": ["same"]}}, "already a key"),
        ("b:k-a", {"a": {"api_keys": ["k-a"]}}, "already a key"),
        ("a:b:c:d", {}, "entry with 3 ':'"),
        ("bad tenant:k", {}, "tenant:key"),
        ("a:k:root", {}, "entry with 2 ':'"),
    ],
)
def test_ambiguous_keys_are_refused(monkeypatch, env, tenants, needle):
    monkeypatch.setenv("DUET_API_KEYS", env)
    with pytest.raises(ValueError, match=needle):
        serve_config_from({"tenants": tenants}).principals()


def test_a_tenant_with_a_typo_or_a_bad_name_is_refused():
    from core.config import ConfigError

    with pytest.raises(ConfigError, match="unknown field"):
        serve_config_from({"tenants": {"a": {"api_key": ["k"]}}})
    with pytest.raises(ConfigError, match="tenant name"):
        serve_config_from({"tenants": {"../a": {"api_keys": ["k"]}}})


# -- isolation, with real jobs ------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_checkpoint, tmp_path_factory):
    config = serve_config_from(
        {
            "checkpoint": tiny_checkpoint,
            "jobs_uri": str(tmp_path_factory.mktemp("tenancy") / "jobs"),
            "api_keys": [KEY_OLD],
            "tenants": _tenants(),
            "fast": {"steps": 1, "sampler": "euler"},
            "full": {"steps": 1, "sampler": "euler"},
        }
    )
    app, backend = build_local_app(config)
    with TestClient(app) as test_client:
        yield test_client
    backend.close()


def _done(client, job_id, headers, timeout=300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_another_tenant_cannot_see_read_download_or_cancel_a_job(client):
    job_id = client.post(
        "/v1/jobs", json={"prompt": "brand a's ball", "duration_s": 1.0}, headers=A
    ).json()["id"]
    job = _done(client, job_id, A)
    assert job["status"] == "succeeded" and job["tenant"] == "brand-a", job
    assert client.get(f"/v1/jobs/{job_id}/video", headers=A).status_code == 200
    store = client.app.state.store
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/video"),
        ("GET", f"/v1/jobs/{job_id}/metadata"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ]:
        for other in (B, OLD):
            response = client.request(method, path, headers=other)
            # Exactly what a job that does not exist answers.
            assert response.status_code == 404, (method, path, response.text)
            assert response.json() == {"detail": f"no job {job_id}"}
    assert not store.cancel_requested(job_id)  # B's cancel touched nothing
    assert job_id not in [j["id"] for j in client.get("/v1/jobs", headers=B).json()["jobs"]]
    assert job_id in [j["id"] for j in client.get("/v1/jobs", headers=A).json()["jobs"]]
    # An admin sees every tenant's jobs and reads them.
    listed = client.get("/v1/jobs", headers=OPS).json()["jobs"]
    assert job_id in [j["id"] for j in listed]
    assert client.get(f"/v1/jobs/{job_id}/video", headers=OPS).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}/metadata", headers=OPS).json()["job_id"] == job_id


def test_a_queued_job_is_cancelled_by_its_own_tenant_only(client):
    store = client.app.state.store
    # Stored as accepted by an ingress that has not dispatched it yet.
    record = store.save(
        JobRecord(id=new_job_id(), spec={"prompt": "b"}, quality="fast", tenant="brand-b")
    )  # noqa: E501
    assert client.post(f"/v1/jobs/{record.id}/cancel", headers=A).status_code == 404
    assert store.load(record.id).status == "queued" and not store.cancel_requested(record.id)
    cancelled = client.post(f"/v1/jobs/{record.id}/cancel", headers=B)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_jobs_stored_before_tenancy_belong_to_the_default_tenant(client):
    """A schema-1 record has no tenant: it is the default tenant's (the bare keys')."""
    store = client.app.state.store
    job_id = new_job_id()
    old = {k: v for k, v in JobRecord(id=job_id, spec={"prompt": "old"}, quality="fast",
                                      status="cancelled").__dict__.items()
           if k not in ("tenant", "fallback")}  # fmt: skip
    old["schema_version"] = 1
    from core import storage

    storage.write_text(store.record_uri(job_id), json.dumps(old))
    assert client.get(f"/v1/jobs/{job_id}", headers=OLD).json()["tenant"] == "default"
    assert client.get(f"/v1/jobs/{job_id}", headers=A).status_code == 404


# -- quotas ---------------------------------------------------------------------------


class _HeldBackend:
    """Runs a job (marks it succeeded) only once the test releases it; records how
    many of each tenant's jobs it holds at once."""

    def __init__(self, store: JobStore):
        self.store = store
        self.release = threading.Event()
        self.holding: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def run(self, job_id: str, quality: str, model: str) -> dict:
        tenant = self.store.load(job_id).tenant
        self.holding[tenant] = self.holding.get(tenant, 0) + 1
        self.peak[tenant] = max(self.peak.get(tenant, 0), self.holding[tenant])
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        self.holding[tenant] -= 1
        record = self.store.load(job_id)
        record.status, record.finished_at = "succeeded", time.time()
        self.store.save(record)
        return {"id": job_id, "status": "succeeded", "error": None}

    async def ready(self) -> dict[str, bool]:
        return {"fast": True, "full": True}


def test_tenant_quotas_answer_429_with_retry_after_and_spare_other_tenants(tmp_path):
    jobs = str(tmp_path / "jobs")
    config = serve_config_from(
        {
            "jobs_uri": jobs,
            "tenants": _tenants(max_running_jobs=1, max_queued_jobs=1),
            "limits": {"retry_after_s": 3},
        }
    )
    backend = _HeldBackend(JobStore(jobs))
    facts = {"fps": 8.0, "resolutions": ["64x64"], "models": ["default"]}
    app = build_api(config, backend, facts)
    with TestClient(app) as client:
        ids = []
        for _ in range(2):  # one running, one queued
            response = client.post("/v1/jobs", json={"prompt": "a"}, headers=A)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        over = client.post("/v1/jobs", json={"prompt": "a"}, headers=A)
        assert over.status_code == 429, over.text
        assert over.headers["Retry-After"] == "3"
        assert "brand-a" in over.json()["detail"] and "quota" in over.json()["detail"]
        # Another tenant has its own quota (the default: 4 running).
        for _ in range(3):
            assert client.post("/v1/jobs", json={"prompt": "b"}, headers=B).status_code == 202
        deadline = time.time() + 10
        while backend.holding.get("brand-b", 0) < 3:
            assert time.time() < deadline, backend.holding
            time.sleep(0.02)
        # brand-a's second job waits queued for its tenant's one running slot.
        assert backend.holding["brand-a"] == 1
        assert client.get(f"/v1/jobs/{ids[1]}", headers=A).json()["status"] == "queued"
        backend.release.set()
        for job_id in ids:
            assert _done(client, job_id, A, timeout=30)["status"] == "succeeded"
        assert backend.peak == {"brand-a": 1, "brand-b": 3}
        # Finished jobs free the quota.
        assert client.post("/v1/jobs", json={"prompt": "a"}, headers=A).status_code == 202
