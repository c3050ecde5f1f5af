"""The serving API's safety guards, each checked by a request it must refuse.

The app runs in process (``serve.local``: the same FastAPI app and dispatcher the
Serve ingress wraps, jobs run on a worker thread) with a random ``tiny`` checkpoint.
Every refusal is also checked to come with a message that names what was wrong.
"""

from __future__ import annotations

import hmac
import http.server
import io
import os
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve import guards
from serve.config import UriPolicyConfig, serve_config_from
from serve.guards import GuardError, fetch_http, output_uri, safe_output_name
from serve.local import build_local_app

KEY = "test-key-0123456789"
AUTH = {"X-API-Key": KEY}


def _png(size=(16, 16), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []
    redirect_to: str | None = None

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        if self.path.startswith("/redirect") and type(self).redirect_to:
            self.send_response(302)
            self.send_header("Location", type(self).redirect_to)
            self.end_headers()
            return
        body = _png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def loopback_server():
    """An HTTP server on 127.0.0.1 that records every request it gets."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_guards")
    allowed = base / "assets"
    allowed.mkdir()
    (allowed / "red.png").write_bytes(_png())
    (base / "secret.png").write_bytes(_png(color=(0, 0, 0)))
    # A link inside the allowed root that points outside it.
    os.symlink(base / "secret.png", allowed / "escape.png")
    return base


@pytest.fixture(scope="module")
def client(tiny_checkpoint, roots):
    config = serve_config_from(
        {
            "checkpoint": tiny_checkpoint,
            "jobs_uri": str(roots / "jobs"),
            "api_keys": ["another-key", KEY],
            "fast": {"steps": 1, "sampler": "euler"},
            "full": {"steps": 1, "sampler": "euler"},
            "limits": {
                "max_prompt_chars": 200,
                "max_duration_s": 4.0,
                "max_images": 2,
                "max_upload_bytes": 200_000,
                "max_request_bytes": 1_000_000,
                "max_pending_jobs": 1,
                "retry_after_s": 7,
            },
            "uri_policy": {
                "allowed_schemes": ["s3", "https", "http", "file"],
                "allowed_buckets": ["brand-assets"],
                "allowed_local_roots": [str(roots / "assets")],
                "http_timeout_s": 1.0,
            },
        }
    )
    app, backend = build_local_app(config)
    with TestClient(app) as test_client:
        yield test_client
    backend.close()


def _wait_idle(client, timeout=120.0):
    """Wait until no job is pending (the pending cap is 1 in these tests)."""
    deadline = time.time() + timeout
    dispatcher = client.app.state.dispatcher
    while any(dispatcher.pending.values()) and time.time() < deadline:
        time.sleep(0.1)


def _submit(client, body, headers=AUTH):
    _wait_idle(client)
    return client.post("/v1/jobs", json=body, headers=headers)


def _detail(response) -> str:
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " ".join(d["msg"] for d in detail)


# -- API keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"X-API-Key": ""}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": KEY + "x"}]
)
def test_generation_endpoints_need_a_valid_key(client, headers):
    job = {"prompt": "a red ball"}
    response = client.post("/v1/jobs", json=job, headers=headers)
    assert response.status_code == 401
    assert "API key" in _detail(response)
    for path in ("/v1/jobs", "/v1/info", f"/v1/jobs/{'0' * 32}"):
        assert client.get(path, headers=headers).status_code == 401


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guards.hmac, "compare_digest", spy)
    keys = ("first-key", "second-key", "third-key")
    assert guards.api_key_matches("first-key", keys)
    # No early exit on a match: every key is compared, with compare_digest.
    assert len(calls) == 3
    calls.clear()
    assert not guards.api_key_matches("first-kez", keys)
    assert len(calls) == 3
    assert not guards.api_key_matches("anything", ())


# -- limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x" * 201}, "200 characters"),
        ({"prompt": "a ball", "duration_s": 9}, "less than or equal to 4"),
        ({"prompt": "a ball", "resolution": "1920x1080"}, "Input should be '64x64'"),
        ({"prompt": "a ball", "fps": 60}, "fps 60 is not served"),
        (
            {"prompt": "a ball", "references": {"images": ["s3://brand-assets/a.png"] * 3}},
            "at most 2",
        ),  # noqa: E501
        ({"prompt": "   "}, "prompt is required"),
        ({"mode": "multishot", "shots": [{"prompt": "a", "duration_s": 3}] * 2}, "limit is 4"),
        ({"prompt": "a", "mode": "v2v"}, "needs a source video"),
        ({"prompt": "a", "seed": -1}, "greater than or equal to 0"),
        ({"prompt": "a", "model": "brand-x"}, "Input should be 'default'"),
    ],
)
def test_limits_are_refused_with_a_clear_4xx(client, body, needle):
    response = _submit(client, body)
    assert response.status_code == 422, response.text
    assert needle in _detail(response)


def test_oversized_body_and_upload_are_refused(client):
    response = client.post(
        "/v1/jobs",
        content=b"{" + b" " * 1_000_001 + b"}",
        headers={**AUTH, "Content-Type": "application/json"},  # noqa: E501
    )
    assert response.status_code == 413 and "1000000 bytes" in _detail(response)
    big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert len(buf.getvalue()) > 200_000
    _wait_idle(client)
    response = client.post(
        "/v1/jobs/upload",
        data={"request": '{"prompt": "a ball"}'},
        files=[("images", ("big.png", buf.getvalue(), "image/png"))],
        headers=AUTH,
    )
    assert response.status_code == 413 and "200000 bytes" in _detail(response)


def test_a_full_queue_answers_429_with_retry_after(client):
    _wait_idle(client)
    first = client.post("/v1/jobs", json={"prompt": "a red ball", "quality": "full"}, headers=AUTH)
    assert first.status_code == 202
    second = client.post(
        "/v1/jobs", json={"prompt": "a blue ball", "quality": "full"}, headers=AUTH
    )  # noqa: E501
    assert second.status_code == 429, second.text
    assert second.headers["Retry-After"] == "7"
    assert "queue is full" in _detail(second)
    _wait_idle(client)


# -- URI policy and SSRF -------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("file:///etc/passwd", "outside the allowed roots"),
        ("/etc/passwd", "outside the allowed roots"),
        ("s3://other-bucket/a.png", "not in the allowed buckets"),
        ("gopher://example.com/a.png", "scheme 'gopher' is not allowed"),
        ("ftp://example.com/a.png", "scheme 'ftp' is not allowed"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://127.0.0.1/a.png", "loopback"),
        ("http://[::1]/a.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/a.png", "loopback"),
        ("http://2130706433/a.png", "loopback"),
        ("http://10.1.2.3/a.png", "private"),
        ("http://192.168.0.10/a.png", "private"),
        ("http://localhost/a.png", "loopback"),
    ],
)
def test_reference_uris_outside_the_policy_are_refused(client, roots, uri, needle):
    response = _submit(client, {"prompt": "a ball", "references": {"images": [uri]}})
    assert response.status_code == 403, response.text
    assert needle in _detail(response)


def test_a_symlink_out_of_an_allowed_root_is_refused(client, roots):
    inside = str(roots / "assets" / "red.png")
    ok = _submit(client, {"prompt": "a ball", "references": {"images": [inside]}})
    assert ok.status_code == 202, ok.text
    escape = str(roots / "assets" / "escape.png")
    response = _submit(client, {"prompt": "a ball", "references": {"images": [escape]}})
    assert response.status_code == 403 and "outside the allowed roots" in _detail(response)


def test_the_loopback_server_is_never_contacted(client, loopback_server):
    port = loopback_server.server_address[1]
    before = len(_Recorder.hits)
    response = _submit(
        client, {"prompt": "a ball", "references": {"images": [f"http://127.0.0.1:{port}/x.png"]}}
    )
    assert response.status_code == 403
    assert len(_Recorder.hits) == before


def _fake_dns(monkeypatch, answers):
    """Point names at addresses the way a DNS server would: through getaddrinfo,
    which both the guard and any plain connect-by-name use. ``answers``: name ->
    list of address lists, handed out in turn (a rebinding server changes its answer)."""
    import socket

    real = socket.getaddrinfo
    served = {name: iter(lists) for name, lists in answers.items()}

    def getaddrinfo(host, port, *args, **kwargs):
        if host in served:
            ip = next(served[host])
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port or 0)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_redirect_to_loopback_is_refused(loopback_server, monkeypatch):
    """The first hop is an allowed host; its redirect to 127.0.0.1 must be checked again."""
    port = loopback_server.server_address[1]
    _Recorder.redirect_to = f"http://localhost:{port}/secret"
    _fake_dns(monkeypatch, {"assets.test": ["127.0.0.1"] * 4})
    policy = UriPolicyConfig(
        allowed_schemes=("http",), private_hosts_allowed=("assets.test",), http_timeout_s=2.0
    )
    before = len(_Recorder.hits)
    with pytest.raises(GuardError) as err:
        fetch_http(f"http://assets.test:{port}/redirect", policy, 100_000)
    assert err.value.status == 403 and "loopback" in err.value.message
    assert _Recorder.hits[before:] == ["/redirect"]  # never /secret
    # The allowed host itself is fetched (the test server is reachable at all).
    assert fetch_http(f"http://assets.test:{port}/ok.png", policy, 100_000).data == _png()


def test_dns_rebinding_cannot_reach_loopback(loopback_server, monkeypatch):
    """A name that resolves public when checked and loopback right after: the
    connection must go to the address that was checked, never to a second answer."""
    port = loopback_server.server_address[1]
    _fake_dns(monkeypatch, {"rebind.test": [["93.184.216.34"][0]] + ["127.0.0.1"] * 5})
    policy = UriPolicyConfig(allowed_schemes=("http",), http_timeout_s=1.0)
    before = len(_Recorder.hits)
    with pytest.raises(GuardError):
        # 93.184.216.34 is not reachable from a test machine: the fetch fails there.
        fetch_http(f"http://rebind.test:{port}/x.png", policy, 100_000)
    assert len(_Recorder.hits) == before


def test_allowed_s3_bucket_is_read(client, s3_server, roots):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="brand-assets")
    boto3.client("s3", endpoint_url=s3_server).put_object(
        Bucket="brand-assets", Key="logo.png", Body=_png()
    )
    ok = _submit(
        client, {"prompt": "a ball", "references": {"images": ["s3://brand-assets/logo.png"]}}
    )  # noqa: E501
    assert ok.status_code == 202, ok.text
    missing = _submit(
        client, {"prompt": "a", "references": {"images": ["s3://brand-assets/no.png"]}}
    )  # noqa: E501
    assert missing.status_code == 422 and "cannot be read" in _detail(missing)


# -- upload probing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "data", "needle"),
    [
        ("images", "cat.png", b"#!/bin/sh\necho not an image\n", "not a readable image"),
        (
            "videos",
            "clip.mp4",
            b"\x00\x00\x00\x18ftypmp42 but nothing else",
            "not a readable video",
        ),  # noqa: E501
        ("audios", "voice.wav", _png(), "has no audio stream"),
    ],
)
def test_uploads_that_are_not_media_are_refused(client, kind, name, data, needle):
    _wait_idle(client)
    response = client.post(
        "/v1/jobs/upload",
        data={"request": '{"prompt": "a ball"}'},
        files=[(kind, (name, data, "application/octet-stream"))],
        headers=AUTH,
    )
    assert response.status_code == 415, response.text
    assert needle in _detail(response)


def test_a_real_image_upload_is_accepted_and_stored_with_the_job(client):
    _wait_idle(client)
    response = client.post(
        "/v1/jobs/upload",
        data={"request": '{"prompt": "a red ball"}'},
        files=[("images", ("red.png", _png(), "image/png"))],
        headers=AUTH,
    )
    assert response.status_code == 202, response.text
    record = client.app.state.store.load(response.json()["id"])
    assert len(record.inputs["images"]) == 1


# -- output names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "..", "a/b", "/etc/passwd", ".hidden", "", "a" * 121, "x\x00y"]
)  # noqa: E501
def test_output_names_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(GuardError):
        safe_output_name(name)
    with pytest.raises(GuardError):
        output_uri(str(tmp_path), name)


def test_safe_output_names_stay_under_the_root(tmp_path):
    assert output_uri(str(tmp_path), "variant-01.mp4") == str(tmp_path / "variant-01.mp4")
    assert output_uri("s3://bucket/out", "v1_a.b") == "s3://bucket/out/v1_a.b"


@pytest.mark.parametrize("job_id", ["..%2F..%2Fetc%2Fpasswd", "..", "0" * 31 + "g", "A" * 32])
def test_job_ids_in_paths_are_checked(client, job_id):
    response = client.get(f"/v1/jobs/{job_id}/video", headers=AUTH)
    assert response.status_code in (404, 422)


def test_unavailable_job_storage_answers_503_with_retry_after(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the job store should be")
    config = serve_config_from(
        {"checkpoint": tiny_checkpoint, "jobs_uri": str(blocker / "jobs"), "api_keys": [KEY]}
    )
    app, backend = build_local_app(config)
    with TestClient(app) as test_client:
        response = test_client.post("/v1/jobs", json={"prompt": "a ball"}, headers=AUTH)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        assert "job storage is unavailable" in _detail(response)
        assert test_client.get("/readyz").status_code == 503
    backend.close()
