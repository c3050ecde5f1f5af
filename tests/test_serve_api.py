"""The job API end to end in process: submit, poll with progress, fetch, cancel, list;
jobs kept in storage outlive the ingress; batched generation equals one-by-one."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from serve.config import serve_config_from
from serve.jobs import JobRecord, JobStore, new_job_id
from serve.local import build_local_app

KEY = "api-test-key"
AUTH = {"X-API-Key": KEY}


def _config(checkpoint: str, jobs_uri: str, **extra):
    return serve_config_from(
        {
            "checkpoint": checkpoint,
            "jobs_uri": jobs_uri,
            "api_keys": [KEY],
            "fast": {"steps": 2, "sampler": "euler"},
            "full": {"steps": 3, "sampler": "heun"},
            **extra,
        }
    )


def _wait(client, job_id, timeout=300.0, until=("succeeded", "failed", "cancelled")):
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        seen.append(job["progress"])
        if job["status"] in until:
            return job, seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


@pytest.fixture(scope="module")
def app_parts(tiny_checkpoint, tmp_path_factory):
    from model.pipeline import DuetPipeline

    base = tmp_path_factory.mktemp("serve_api")
    jobs = str(base / "jobs")
    # A second named checkpoint with other weights (another seed): routed by the
    # request's "model", so which weights ran shows in the clip.
    brand = str(base / "brand-a")
    DuetPipeline.from_preset("tiny", seed=1).save(brand)
    app, backend = build_local_app(_config(tiny_checkpoint, jobs, models={"brand-a": brand}))
    with TestClient(app) as client:
        yield client, jobs
    backend.close()


def test_submit_poll_fetch_a_cropped_clip(app_parts):
    from core.media import probe_media

    client, jobs = app_parts
    response = client.post(
        "/v1/jobs",
        json={"prompt": "a red ball bounces", "quality": "full", "seed": 3, "resolution": "36x64",
              "negative_prompt": "blurry"},
        headers=AUTH,
    )  # fmt: skip
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job, progress = _wait(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["compute_s"] > 0
    assert any(0 < p < 1 for p in progress), progress  # progress was reported mid-way
    video = client.get(f"/v1/jobs/{job_id}/video", headers=AUTH)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = f"{jobs}/fetched.mp4"
    with open(path, "wb") as fh:
        fh.write(video.content)
    info = probe_media(path)
    assert (info.width, info.height) == (36, 64) and info.has_audio
    meta = client.get(f"/v1/jobs/{job_id}/metadata", headers=AUTH).json()
    assert meta["negative_prompt"] == "blurry" and meta["steps"] == 3 and meta["quality"] == "full"
    assert "video" not in meta  # storage paths stay server-side
    listed = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
    assert listed[0]["id"] == job_id


def test_a_running_job_can_be_cancelled(app_parts):
    client, _ = app_parts
    # Long enough (10 s of frames, 3 Heun steps) to still be running when cancelled.
    job_id = client.post(
        "/v1/jobs", json={"prompt": "a long one", "quality": "full", "duration_s": 10}, headers=AUTH
    ).json()["id"]
    _wait(client, job_id, until=("running",))
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert cancelled.status_code == 200
    job, _ = _wait(client, job_id)
    assert job["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job_id}/video", headers=AUTH).status_code == 409


def test_multishot_v2v_and_a_named_model(app_parts):
    client, jobs = app_parts
    shots = [
        {"prompt": "a red ball", "duration_s": 1.0},
        {"prompt": "a blue ball", "duration_s": 1.0, "transition": "fade", "fade_s": 0.25},
    ]
    multishot = client.post(
        "/v1/jobs", json={"mode": "multishot", "shots": shots, "model": "brand-a"}, headers=AUTH
    ).json()["id"]  # fmt: skip
    job, _ = _wait(client, multishot)
    assert job["status"] == "succeeded", job
    meta = client.get(f"/v1/jobs/{multishot}/metadata", headers=AUTH).json()
    assert meta["model"] == "brand-a" and len(meta["shots"]["shots"]) == 2
    source = client.get(f"/v1/jobs/{multishot}/video", headers=AUTH).content
    edit = client.post(
        "/v1/jobs/upload",
        data={
            "request": '{"prompt": "a green ball", "mode": "v2v", "strength": 0.5, "keep_audio": true}'
        },  # noqa: E501
        files=[("source", ("source.mp4", source, "video/mp4"))],
        headers=AUTH,
    )
    assert edit.status_code == 202, edit.text
    job, _ = _wait(client, edit.json()["id"])
    assert job["status"] == "succeeded", job
    meta = client.get(f"/v1/jobs/{job['id']}/metadata", headers=AUTH).json()
    assert meta["edit"] == {"strength": 0.5, "keep": "audio"}


def test_the_named_model_runs_its_own_weights(app_parts):
    """The same request on "default" and on "brand-a" gives different clips, and
    the same one on "brand-a" twice the same clip: the difference is the weights.
    (With one checkpoint under both names, as before, routing could not be seen.)"""
    from core.media import read_video

    client, jobs = app_parts
    clips = []
    for i, model in enumerate(("default", "brand-a", "brand-a")):
        body = {"prompt": "a red ball", "seed": 5, "duration_s": 1.0, "model": model}
        job_id = client.post("/v1/jobs", json=body, headers=AUTH).json()["id"]
        assert _wait(client, job_id)[0]["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{job_id}/metadata", headers=AUTH).json()["model"] == model
        path = f"{jobs}/routed-{i}.mp4"
        with open(path, "wb") as fh:
            fh.write(client.get(f"/v1/jobs/{job_id}/video", headers=AUTH).content)
        clips.append(read_video(path)[0].astype(int))
    # Same weights: equal up to encoder noise (mean 0.0-0.08 seen); other weights:
    # another clip (mean ~37 of 255).
    same, other = (np.abs(clips[1] - clips[2]).mean(), np.abs(clips[0] - clips[1]).mean())
    assert same < 1.0 and other > 10.0, (same, other)


def test_unknown_job_is_404(app_parts):
    client, _ = app_parts
    response = client.get(f"/v1/jobs/{'a' * 32}", headers=AUTH)
    assert response.status_code == 404 and "no job" in response.json()["detail"]


@pytest.mark.slow
def test_jobs_survive_an_ingress_restart(tiny_checkpoint, s3_bucket):
    """Job state lives in storage (here S3): a new ingress finds a job the old one
    accepted but never ran, runs it, and serves one that finished before."""
    jobs = f"{s3_bucket}/jobs"
    config = _config(tiny_checkpoint, jobs, stale_after_s=4.0)
    app, backend = build_local_app(config)
    with TestClient(app) as client:
        done = client.post("/v1/jobs", json={"prompt": "before restart"}, headers=AUTH).json()["id"]
        assert _wait(client, done)[0]["status"] == "succeeded"
    backend.close()
    # Accepted by an ingress that died before dispatching it.
    orphan = JobRecord(
        id=new_job_id(), spec={"prompt": "orphaned", "duration_s": 1.0}, quality="fast"
    )  # noqa: E501
    JobStore(jobs).save(orphan)

    app, backend = build_local_app(config)
    with TestClient(app) as client:
        job, _ = _wait(client, orphan.id)
        assert job["status"] == "succeeded", job
        assert client.get(f"/v1/jobs/{done}/video", headers=AUTH).status_code == 200
        ids = [j["id"] for j in client.get("/v1/jobs", headers=AUTH).json()["jobs"]]
        assert ids[:2] == [orphan.id, done]
    backend.close()


def _make_text_matter(pipeline) -> None:
    """Random init leaves the DiT's zero-initialised output layers at zero, so neither
    prompt nor step count would change a clip; small weights there make them count."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in pipeline.dit.parameters():
            if not param.any():
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))


def test_batched_generation_matches_one_by_one(tiny_checkpoint):
    """A clip does not depend on what it was batched with (same seeded noise)."""
    from model.generate import GenerationRequest, generate
    from model.pipeline import DuetPipeline
    from pipelines.generation import generate_many

    pipeline = DuetPipeline.from_checkpoint(tiny_checkpoint).eval()
    _make_text_matter(pipeline)
    requests = [
        GenerationRequest(prompt=p, duration_s=1.0, seed=s, steps=2, sampler="heun")
        for p, s in (("a red ball", 1), ("a blue square bounces", 2), ("a green ball", 3))
    ]
    batched = generate_many(pipeline, requests, max_batch=3)
    assert all(r.metadata["batch_size"] == 3 for r in batched)
    for request, result in zip(requests, batched, strict=True):
        alone = generate(request, pipeline=pipeline)
        for a, b in zip(alone.latents, result.latents, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        diff = np.abs(alone.clip.frames.astype(int) - result.clip.frames.astype(int))
        assert diff.max() <= 2, diff.max()
        np.testing.assert_allclose(alone.clip.audio, result.clip.audio, atol=2e-3)
    # A negative prompt changes its own clip only.
    mixed = generate_many(pipeline, requests[:2], ["", "a red ball"], max_batch=2)
    assert np.array_equal(mixed[0].clip.frames, batched[0].clip.frames)
    assert not np.array_equal(mixed[1].clip.frames, batched[1].clip.frames)


def test_fast_uses_a_distilled_student_when_configured(tiny_checkpoint, tmp_path):
    """With a Fast student checkpoint (``extra.fast``, as ``duet train distill`` writes),
    the fast deployment samples it with ``generate(quality="fast")``: guidance
    distilled in, one network evaluation per step."""
    from model.pipeline import DuetPipeline

    student = str(tmp_path / "student")
    fast = {"steps": [4, 8], "default_steps": 4, "sampler": "euler"}
    weights = DuetPipeline.from_checkpoint(tiny_checkpoint)
    _make_text_matter(weights)
    weights.save(student, extra={"fast": fast})
    config = _config(tiny_checkpoint, str(tmp_path / "jobs"))
    config.fast.checkpoint, config.fast.steps = student, 4
    app, backend = build_local_app(config)
    with TestClient(app) as client:
        job_id = client.post("/v1/jobs", json={"prompt": "a red ball"}, headers=AUTH).json()["id"]
        assert _wait(client, job_id)[0]["status"] == "succeeded"
        meta = client.get(f"/v1/jobs/{job_id}/metadata", headers=AUTH).json()
    backend.close()
    assert meta["quality"] == "fast" and meta["steps"] == 4
    assert meta["network_evals"] == 4 and meta["text_scale"] == 1.0

    # Batched the student's way, each clip is what generate(quality="fast") makes alone.
    from model.generate import GenerationRequest, generate
    from pipelines.generation import generate_many

    pipeline = DuetPipeline.from_checkpoint(student).eval()
    requests = [GenerationRequest(prompt=f"a ball {i}", duration_s=1.0, seed=i) for i in range(3)]
    batched = generate_many(pipeline, requests, quality="fast", max_batch=3)
    for request, result in zip(requests, batched, strict=True):
        assert result.metadata["batch_size"] == 3 and result.metadata["network_evals"] == 4
        alone = generate(request, pipeline=pipeline, quality="fast")
        for a, b in zip(alone.latents, result.latents, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    # A student distilled with the renoise sampler is sampled with it: fresh noise from
    # each request's own generator, so batched clips are still what it makes alone.
    renoise = str(tmp_path / "renoise")
    weights.save(renoise, extra={"fast": {**fast, "sampler": "renoise"}})
    pipeline = DuetPipeline.from_checkpoint(renoise).eval()
    batched = generate_many(pipeline, requests, quality="fast", max_batch=3)
    for request, result in zip(requests, batched, strict=True):
        assert result.metadata["network_evals"] == 4
        alone = generate(request, pipeline=pipeline, quality="fast")
        assert alone.metadata["sampler"] == "renoise"
        for a, b in zip(alone.latents, result.latents, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    euler = generate(requests[0], pipeline=DuetPipeline.from_checkpoint(student).eval(),
                     quality="fast")  # fmt: skip
    assert not torch.allclose(euler.latents[0], batched[0].latents[0], atol=1e-3)

    # A student distilled at its own time shift (distill.dmd.time_shift) steps at it,
    # alone and batched; one that records none at the resolution shift.
    shifted = str(tmp_path / "shifted")
    weights.save(shifted, extra={"fast": {**fast, "time_shift": 3.0}})
    pipeline = DuetPipeline.from_checkpoint(shifted).eval()
    batched = generate_many(pipeline, requests, quality="fast", max_batch=3)
    for request, result in zip(requests, batched, strict=True):
        alone = generate(request, pipeline=pipeline, quality="fast")
        assert alone.metadata["shift"] == result.metadata["shift"] == 3.0
        for a, b in zip(alone.latents, result.latents, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert euler.metadata["shift"] != 3.0
    assert not torch.allclose(euler.latents[0], batched[0].latents[0], atol=1e-3)
    for bad in (-2.0, float("nan"), "3", True):
        pipeline.fast = {**fast, "time_shift": bad}
        with pytest.raises(ValueError, match="time_shift"):
            generate(requests[0], pipeline=pipeline, quality="fast")
