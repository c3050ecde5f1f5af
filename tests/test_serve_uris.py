"""The one URI guard: every address class a server must not fetch from, in every
spelling, through every URI-bearing field of a request.

The guard itself (``serve.guards.fetch_http``) is driven with a resolver the test
controls: for a host written as an address it must not be asked at all (the guard
reads the address itself), for a name it answers what an attacker's DNS would.
Redirect, scheme and size rules are checked against an HTTP server on loopback
reached through a name that the policy allows to be private.
"""

from __future__ import annotations

import http.server
import ipaddress
import threading

import pytest
from fastapi.testclient import TestClient

from serve.api import TEXT_FIELDS, URI_FIELDS, build_api, request_models
from serve.config import UriPolicyConfig, serve_config_from
from serve.guards import GuardError, address_is_public, fetch_http, parse_ipv4_literal

KEY = "uri-test-key"
AUTH = {"X-API-Key": KEY}
FACTS = {"fps": 8.0, "resolutions": ["64x64"], "models": ["default"]}
HTTP_ONLY = UriPolicyConfig(allowed_schemes=("http",), http_timeout_s=2.0)


def _no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"the guard asked a resolver about the address literal {host!r}")


# -- address classes, written as addresses -------------------------------------------

DENIED_LITERALS = [
    # IPv4, every spelling inet_aton reads
    "0.0.0.0", "0", "127.0.0.1", "127.1", "127.0.1", "0177.0.0.1", "0x7f.0.0.1", "0x7f.1",
    "0x7f000001", "2130706433", "017700000001", "127.0.0.1.", "10.0.0.1", "012.1",
    "172.16.0.1", "192.168.1.1", "169.254.169.254", "0xa9.0xfe.0xa9.0xfe", "2852039166",
    "100.64.0.1", "224.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1",
    # IPv6: loopback, unspecified, unique-local (fc00::/7), link-local
    "[::1]", "[::]", "[fc00::1]", "[fd00::1]", "[fd00:ec2::254]", "[fe80::1]",
    "[fe80::1%25eth0]", "[ff02::1]",
    # IPv4 carried in IPv6: mapped, compatible, 6to4, NAT64 (well-known and local-use)
    "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]",
    "[::ffff:10.0.0.1]", "[::127.0.0.1]", "[2002:7f00:1::1]", "[2002:a9fe:a9fe::1]",
    "[2002:c0a8:101::]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[64:ff9b::10.0.0.1]",
    "[64:ff9b:1::808:808]",
    # Teredo: its far end is an IPv4 host the guard cannot check
    "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "[2001::1]",
]  # fmt: skip


@pytest.mark.parametrize("host", DENIED_LITERALS)
def test_address_literals_are_refused_without_a_lookup(host):
    with pytest.raises(GuardError) as err:
        fetch_http(f"http://{host}:8080/a.png", HTTP_ONLY, 1000, resolver=_no_dns)
    assert err.value.status == 403, err.value.message
    assert "does not fetch from there" in err.value.message


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("0x7f.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0", "0.0.0.0"),
        ("10.1", "10.0.0.1"), ("192.168.257", "192.168.1.1"), ("0xA9.254.43518", "169.254.169.254"),
        ("8.8.8.8", "8.8.8.8"), ("example.com", None), ("cafe.be", None), ("0x", None),
        ("1.2.3.4.5", None), ("08.1.1.1", None),
    ],
)  # fmt: skip
def test_ipv4_literals_are_read_as_inet_aton_reads_them(host, address):
    parsed = parse_ipv4_literal(host)
    assert (str(parsed) if parsed else None) == address


@pytest.mark.parametrize("host", ["256.1.1.1", "1.2.3.256", "1.16777216", "4294967296"])
def test_out_of_range_ipv4_literals_are_refused(host):
    with pytest.raises(GuardError) as err:
        fetch_http(f"http://{host}/a.png", HTTP_ONLY, 1000, resolver=_no_dns)
    assert err.value.status == 422 and "not a valid IPv4" in err.value.message


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1",
     "64:ff9b::808:808"],
)  # fmt: skip
def test_public_addresses_in_any_form_stay_allowed(address):
    assert address_is_public(ipaddress.ip_address(address))


# -- the same classes behind a name ---------------------------------------------------


@pytest.mark.parametrize(
    "answers",
    [
        ["127.0.0.1"], ["0.0.0.0"], ["169.254.169.254"], ["fd00:ec2::254"], ["fe80::1%2"],
        ["::ffff:169.254.169.254"], ["2002:a9fe:a9fe::1"], ["64:ff9b::a9fe:a9fe"],
        ["2001:0:4136:e378:8000:63bf:3fff:fdd2"],
        ["93.184.216.34", "10.0.0.1"],  # one bad answer among good ones is enough
    ],
)  # fmt: skip
def test_names_resolving_to_denied_addresses_are_refused(answers):
    asked = []

    def resolver(host, port):
        asked.append(host)
        return answers

    with pytest.raises(GuardError) as err:
        fetch_http("http://assets.evil.test/a.png", HTTP_ONLY, 1000, resolver=resolver)
    assert err.value.status == 403 and asked == ["assets.evil.test"]


# -- redirects, schemes and sizes, against a real server -------------------------------


class _Assets(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        routes = {
            "/to-file": "file:///etc/passwd",
            "/to-gopher": "gopher://assets.test/x",
            "/to-https": "https://assets.test/ok",
            "/to-loopback": "http://127.0.0.1/ok",
            "/loop": "/loop",
        }
        if self.path in routes:
            self.send_response(302)
            self.send_header("Location", routes[self.path])
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(5):
                self.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def assets():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Assets)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://assets.test:{server.server_address[1]}"
    server.shutdown()


def _to_loopback(host, port):
    return ["127.0.0.1"] if host == "assets.test" else _no_dns(host, port)


POLICY = UriPolicyConfig(
    allowed_schemes=("http",), private_hosts_allowed=("assets.test",), max_redirects=3,
    http_timeout_s=2.0,
)  # fmt: skip


def test_the_test_server_is_reachable_through_the_allowed_name(assets):
    assert fetch_http(f"{assets}/ok", POLICY, 1000, resolver=_to_loopback).data == b"ok"


@pytest.mark.parametrize(
    ("path", "status", "needle"),
    [
        ("/to-file", 403, "scheme 'file'"),
        ("/to-gopher", 403, "scheme 'gopher'"),
        ("/to-https", 403, "scheme 'https'"),  # allowed by the URI check, not by this policy
        ("/to-loopback", 403, "does not fetch from there"),
        ("/loop", 422, "more than 3 redirects"),
        ("/big", 413, "5000 bytes"),
        ("/big-chunked", 413, "larger than the limit"),
    ],
)
def test_redirects_schemes_and_sizes_are_checked_per_hop(assets, path, status, needle):
    before = len(_Assets.hits)
    with pytest.raises(GuardError) as err:
        fetch_http(f"{assets}{path}", POLICY, 1000, resolver=_to_loopback)
    assert err.value.status == status and needle in err.value.message, err.value.message
    hits = _Assets.hits[before:]
    # A refused hop is never requested: only the server's own paths were fetched.
    assert all(not h.startswith("/ok") for h in hits), hits
    if path == "/loop":
        assert hits == ["/loop"] * 4  # the first request and 3 redirects, no more


# -- every URI-bearing field goes through the guard -----------------------------------


def _string_fields(schema: dict, node: dict, path: str, out: set[str]) -> None:
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    for option in node.get("anyOf", []):
        _string_fields(schema, option, path, out)
    if node.get("type") == "string" or "enum" in node or "const" in node:
        if all(isinstance(v, str) for v in node.get("enum", [node.get("const", "")])):
            out.add(path)
    if node.get("type") == "array":
        _string_fields(schema, node["items"], path + "[]", out)
    for name, child in node.get("properties", {}).items():
        _string_fields(schema, child, f"{path}.{name}" if path else name, out)


def test_every_string_field_of_a_request_is_classified_uri_or_text():
    """A new string field must be added to URI_FIELDS (and so to the guard's walk) or
    to TEXT_FIELDS: a URI the server would fetch cannot slip past unclassified."""
    config = serve_config_from({"api_keys": [KEY]})
    JobRequest, _, _ = request_models(config, FACTS)  # noqa: N806
    schema = JobRequest.model_json_schema()
    found: set[str] = set()
    _string_fields(schema, schema, "", found)
    assert found == set(URI_FIELDS) | set(TEXT_FIELDS)


class _NoBackend:
    async def run(self, job_id, quality, model):
        raise AssertionError("a refused job must never be dispatched")

    async def ready(self):
        return {"fast": True, "full": True}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    config = serve_config_from(
        {
            "jobs_uri": str(tmp_path_factory.mktemp("uris") / "jobs"),
            "api_keys": [KEY],
            "uri_policy": {"allowed_schemes": ["http", "https"], "http_timeout_s": 1.0},
        }
    )
    with TestClient(build_api(config, _NoBackend(), FACTS)) as test_client:
        yield test_client


BAD = [
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://0x7f.1/a",
    "http://[64:ff9b::a9fe:a9fe]/",
]


@pytest.mark.parametrize("uri", BAD)
@pytest.mark.parametrize(
    "field",
    ["images", "videos", "audios", "source"],
)
def test_every_uri_field_of_the_api_is_guarded(client, field, uri):
    if field == "source":
        body = {"prompt": "a", "mode": "v2v", "source": uri}
    else:
        body = {"prompt": "a", "references": {field: [uri]}}
    response = client.post("/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 403, response.text
    assert "does not fetch from there" in response.json()["detail"]


def test_batch_brief_product_references_are_guarded(client, tmp_path):
    """An ad brief's product references become each variant's image references."""
    from pipelines.adgen import load_brief

    brief = tmp_path / "brief.toml"
    brief.write_text(
        'prompt_templates = ["a {colour} sneaker"]\n'
        'product_references = ["http://[::ffff:169.254.169.254]/latest/meta-data/"]\n'
        '[slots]\ncolour = ["red"]\n'
    )
    _, variants = load_brief(str(brief))
    response = client.post("/v1/jobs", json=variants[0].job(None), headers=AUTH)
    assert response.status_code == 403, response.text
