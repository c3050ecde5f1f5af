"""Honest Fast: a request mode the Fast student was never distilled for (references,
multi-shot, V2V) is refused with the reason, or, when the config says so, run by the
Full model at the Fast deployment's step count with that written in the job's
metadata. Never served silently degraded.

The Fast deployment serves a student checkpoint (``extra.fast`` as ``duet train
distill`` writes it; weights: the random ``tiny`` ones) and Full the ``tiny`` one.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from serve.config import serve_config_from
from serve.local import build_local_app

KEY = "fast-modes-key"
AUTH = {"X-API-Key": KEY}
SHOTS = [{"prompt": "a red ball", "duration_s": 1.0}, {"prompt": "a blue ball", "duration_s": 1.0}]


@pytest.fixture(scope="module")
def student(tiny_checkpoint, tmp_path_factory) -> str:
    from model.pipeline import DuetPipeline

    uri = str(tmp_path_factory.mktemp("fast_student") / "student")
    fast = {"steps": [2, 4], "default_steps": 2, "sampler": "euler", "guidance": "distilled"}
    DuetPipeline.from_checkpoint(tiny_checkpoint).save(uri, extra={"fast": fast})
    return uri


def _client(tiny_checkpoint, student, jobs, unsupported):
    config = serve_config_from(
        {
            "checkpoint": tiny_checkpoint,
            "jobs_uri": jobs,
            "api_keys": [KEY],
            "fast": {"checkpoint": student, "steps": 2, "sampler": "euler",
                     "unsupported_modes": unsupported},
            "full": {"steps": 3, "sampler": "heun"},
            "uri_policy": {"allowed_schemes": ["s3"], "allowed_buckets": ["brand"]},
        }
    )  # fmt: skip
    return build_local_app(config)


def _wait(client, job_id, timeout=300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        ({"mode": "multishot", "shots": SHOTS}, "['multishot']"),
        ({"prompt": "a ball", "references": {"images": ["s3://brand/logo.png"]}}, "['references']"),
        ({"prompt": "a ball", "mode": "v2v", "source": "s3://brand/clip.mp4"}, "['v2v']"),
    ],
)
def test_modes_the_student_never_learnt_are_refused_by_default(
    tiny_checkpoint, student, tmp_path, body, missing
):
    app, backend = _client(tiny_checkpoint, student, str(tmp_path / "jobs"), "refuse")
    with TestClient(app) as client:
        info = client.get("/v1/info", headers=AUTH).json()
        assert info["fast_modes"] == {"default": ["t2av"]}
        assert info["fast_unsupported_modes"] == "refuse"
        refused = client.post("/v1/jobs", json={**body, "quality": "fast"}, headers=AUTH)
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"][0]["msg"]
        assert f"distilled for ['t2av'] only, not for {missing}" in detail
        assert "quality 'full'" in detail
        # Full takes the same request; Fast takes plain text-to-audio-video.
        if "mode" in body and body["mode"] == "multishot":
            full = client.post("/v1/jobs", json={**body, "quality": "full"}, headers=AUTH)
            assert full.status_code == 202, full.text
            fast = client.post("/v1/jobs", json={"prompt": "a ball"}, headers=AUTH)
            assert fast.status_code == 202, fast.text
            for job_id in (full.json()["id"], fast.json()["id"]):
                assert _wait(client, job_id)["status"] == "succeeded"
    backend.close()


def test_full_model_fallback_runs_at_fast_steps_and_says_so(tiny_checkpoint, student, tmp_path):
    app, backend = _client(tiny_checkpoint, student, str(tmp_path / "jobs"), "full_model")
    with TestClient(app) as client:
        multishot = client.post(
            "/v1/jobs", json={"mode": "multishot", "shots": SHOTS, "quality": "fast"}, headers=AUTH
        )  # fmt: skip
        assert multishot.status_code == 202, multishot.text
        plain = client.post("/v1/jobs", json={"prompt": "a ball", "quality": "fast"}, headers=AUTH)
        job = _wait(client, multishot.json()["id"])
        assert job["status"] == "succeeded" and job["quality"] == "fast", job
        meta = client.get(f"/v1/jobs/{job['id']}/metadata", headers=AUTH).json()
        # Run by Full's weights (guided: text_scale 4, two rows per step) at Fast's 2 steps.
        assert meta["deployment"] == "full" and meta["quality"] == "fast"
        assert meta["steps"] == 2 and meta["sampler"] == "euler" and meta["text_scale"] == 4.0
        assert "not for ['multishot']" in meta["fallback"]
        assert "Full model at the Fast deployment's 2 euler steps" in meta["fallback"]
        # A mode the student learnt stays on the student: no fallback note.
        assert _wait(client, plain.json()["id"])["status"] == "succeeded"
        meta = client.get(f"/v1/jobs/{plain.json()['id']}/metadata", headers=AUTH).json()
        assert meta["deployment"] == "fast" and "fallback" not in meta
        assert meta["text_scale"] == 1.0 and meta["network_evals"] == 2  # the student's way
    backend.close()
