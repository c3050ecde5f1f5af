"""The gate in front of the API: every /v1 route needs a key, checked before any body
byte is read; the body and each multipart part are limited on the bytes received.

The app is the real API (``serve.api.build_api``) over a backend that runs nothing
(these tests never get as far as a job), served by uvicorn on loopback so requests
are real HTTP: chunked bodies, bodies never sent, connections the server closes.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from serve.api import build_api, require_principal
from serve.config import serve_config_from
from serve.local import ServerThread

KEY = "gate-test-key"
AUTH = {"X-API-Key": KEY}
MAX_BODY = 100_000
MAX_PART = 20_000
FACTS = {"fps": 8.0, "resolutions": ["64x64"], "models": ["default"]}


class _IdleBackend:
    """Accepts nothing: a job that got this far would stay queued (never reached)."""

    async def run(self, job_id: str, quality: str, model: str) -> dict:
        raise AssertionError("the gate tests never dispatch a job")

    async def ready(self) -> dict[str, bool]:
        return {"fast": True, "full": True}


def _app(tmp_path):
    config = serve_config_from(
        {
            "jobs_uri": str(tmp_path / "jobs"),
            "api_keys": [KEY],
            "limits": {"max_request_bytes": MAX_BODY, "max_upload_bytes": MAX_PART},
        }
    )
    return build_api(config, _IdleBackend(), FACTS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerThread(_app(tmp_path_factory.mktemp("gate"))) as running:
        yield running


def _routes(app):
    """Every route the app serves, routers included (FastAPI may keep an included
    router as one entry that expands to its routes)."""
    for route in app.routes:
        expand = getattr(route, "effective_route_contexts", None)
        yield from (expand() if expand else [route])


def _unauthenticated_v1_routes(app) -> list[str]:
    """Every /v1 route whose dependencies do not include the key check."""
    missing = []
    for route in _routes(app):
        if not str(getattr(route, "path", "")).startswith("/v1"):
            continue
        dependant = getattr(route, "dependant", None)
        calls = [dep.call for dep in dependant.dependencies] if dependant else []
        if require_principal not in calls:
            missing.append(f"{sorted(getattr(route, 'methods', None) or [])} {route.path}")
    return missing


def test_every_v1_route_depends_on_the_key_check(tmp_path):
    app = _app(tmp_path)
    v1 = [r for r in _routes(app) if r.path.startswith("/v1")]
    assert len(v1) == 12, [r.path for r in v1]
    assert _unauthenticated_v1_routes(app) == []


def test_a_route_added_without_the_key_check_is_caught_and_still_refused(tmp_path):
    """The walk above can fail: a route added straight on the app is named. The gate
    denies by default, so that route still answers 401 without a key."""
    app = _app(tmp_path)

    @app.get("/v1/forgotten")
    async def forgotten() -> dict:
        return {"secret": "tenant data"}

    assert _unauthenticated_v1_routes(app) == ["['GET'] /v1/forgotten"]
    with TestClient(app) as client:
        assert client.get("/v1/forgotten").status_code == 401
        assert client.get("/v1/forgotten", headers=AUTH).json() == {"secret": "tenant data"}


def _calls(app):
    """One request per /v1 route and method, path parameters filled validly."""
    for route in _routes(app):
        if route.path.startswith("/v1"):
            path = route.path.replace("{job_id}", "0" * 32)
            for method in sorted(route.methods):
                yield method, path


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": KEY + "x"}])
def test_every_v1_route_answers_401_without_a_valid_key(tmp_path, headers):
    app = _app(tmp_path)
    with TestClient(app) as client:
        calls = list(_calls(app))
        assert len(calls) == 12
        for method, path in calls:
            response = client.request(method, path, headers=headers, json={"prompt": "a"})
            assert response.status_code == 401, (method, path, response.text)
            assert "API key" in response.json()["detail"]
        # The public paths stay public.
        for path in ("/healthz", "/openapi.json", "/", "/rank"):
            assert client.get(path).status_code == 200, path


def _raw(server, head: bytes, body_parts: list[bytes] = (), timeout: float = 10.0) -> bytes:
    """Send a request's head and some body bytes, never finishing the body; return what
    the server answers (b"" if it waits for the rest until ``timeout``)."""
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        sock.settimeout(timeout)
        started = time.monotonic()
        try:
            data = sock.recv(65536)
        except TimeoutError:
            data = b""
        assert time.monotonic() - started < timeout
        return data


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_no_key_and_a_huge_body_is_401_before_the_body_is_sent(server):
    """Declared 10 GB, not one byte sent: the answer comes at once, and it is 401."""
    head = _head("/v1/jobs", {"Content-Type": "application/json", "Content-Length": str(10**10)})
    answer = _raw(server, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    chunked = _head(
        "/v1/jobs/upload",
        {"Content-Type": "multipart/form-data; boundary=xx", "Transfer-Encoding": "chunked"},
    )
    answer = _raw(server, chunked, [b"4000\r\n" + b"x" * 0x4000 + b"\r\n"])
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def _chunks(total: int, size: int = 7_000):
    body = b"{" + b" " * (total - 2) + b"}"  # valid JSON: {} padded with spaces
    for start in range(0, total, size):
        yield body[start : start + size]


def test_a_chunked_body_over_the_limit_is_413_not_parsed(server):
    """limit + 1 bytes sent chunked (no Content-Length to check): 413, never 422."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        over = client.post(
            "v1/jobs",
            content=_chunks(MAX_BODY + 1),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert "content-length" not in {k.lower() for k in over.request.headers}
        assert over.status_code == 413, over.text
        assert f"{MAX_BODY} bytes" in over.json()["detail"]
        # Without a key the same body is 401.
        anonymous = client.post(
            "v1/jobs", content=_chunks(MAX_BODY + 1), headers={"Content-Type": "application/json"}
        )
        assert anonymous.status_code == 401, anonymous.text
        # At the limit it is read and parsed: {} has no prompt.
        at = client.post(
            "v1/jobs",
            content=_chunks(MAX_BODY),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert at.status_code == 422 and "prompt is required" in at.text, at.text


def test_the_body_limit_cuts_off_a_body_still_being_sent(server):
    """The server answers 413 as soon as the bytes received pass the limit, without
    waiting for (or reading) the rest of a body that would never end."""
    head = _head(
        "/v1/jobs",
        {**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    chunk = b"%x\r\n%s\r\n" % (MAX_BODY + 1, b" " * (MAX_BODY + 1))
    answer = _raw(server, head, [chunk])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def _multipart_start(boundary: str, name: str, filename: str) -> bytes:
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def test_a_multipart_part_over_its_limit_is_413_as_it_arrives(server):
    """One file part of MAX_PART + 1 bytes, in a body far under the body limit and
    never finished: the gate answers 413 naming the part, without waiting."""
    boundary = "duetboundary"
    head = _head(
        "/v1/jobs/upload",
        {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}",
         "Transfer-Encoding": "chunked"},
    )  # fmt: skip
    data = _multipart_start(boundary, "images", "big.png") + b"\x89" * (MAX_PART + 64)
    answer = _raw(server, head, [b"%x\r\n%s\r\n" % (len(data), data)])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"big.png" in answer and f"{MAX_PART} bytes".encode() in answer


def test_too_many_multipart_parts_are_413(server):
    boundary = "duetboundary"
    parts = (
        b"".join(_multipart_start(boundary, "images", f"{i}.png") + b"x\r\n" for i in range(40))
        + f"--{boundary}--\r\n".encode()
    )
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post(
            "v1/jobs/upload",
            content=parts,
            headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    assert response.status_code == 413 and "parts" in response.json()["detail"], response.text
