"""What keeps the API safe to expose: keys, URI policy, SSRF-safe fetches, media probing,
output names.

Every check raises :class:`GuardError` carrying the HTTP status and a message that
says what was refused and why; the API turns it into that response.
"""

from __future__ import annotations

import hmac
import http.client
import ipaddress
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import PurePosixPath
from urllib.parse import urljoin, urlsplit

import numpy as np

from core import storage
from serve.config import LimitsConfig, UriPolicyConfig


class GuardError(Exception):
    """A request refused by a guard: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# -- API keys ----------------------------------------------------------------------


def api_key_matches(provided: str | None, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key (no early exit, so the
    time taken says nothing about which key or how many characters matched)."""
    if not provided or not keys:
        return False
    given = provided.encode("utf-8")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode("utf-8"))
    return found


# -- output names ------------------------------------------------------------------

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def safe_output_name(name: str) -> str:
    """A client-chosen name usable as one path segment under an output root."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise GuardError(
            422,
            f"output name {name!r} is not allowed: use 1-120 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit, and no '..'",
        )
    return name


def output_uri(root: str, *names: str) -> str:
    """``root/name/...`` for safe names, checked to stay under ``root``."""
    parts = [safe_output_name(n) for n in names]
    uri = storage.join(root, *parts)
    base = storage.strip_scheme(root).rstrip("/")
    joined = os.path.normpath(storage.strip_scheme(uri))
    if not (joined == os.path.normpath(base) or joined.startswith(os.path.normpath(base) + "/")):
        raise GuardError(422, f"output {uri!r} would leave the output root {root!r}")
    return uri


# -- reference URIs ----------------------------------------------------------------


@dataclass
class Fetched:
    data: bytes
    final_url: str


def check_reference_uri(uri: str, policy: UriPolicyConfig) -> str:
    """Refuse URIs outside the policy; returns the URI to read (normalised for local)."""
    if not isinstance(uri, str) or not uri.strip():
        raise GuardError(422, "a reference URI must be a non-empty string")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower() if "://" in uri else "file"
    allowed = tuple(s.lower() for s in policy.allowed_schemes)
    if scheme not in allowed:
        raise GuardError(
            403, f"reference URI scheme {scheme!r} is not allowed (allowed: {list(allowed)})"
        )
    if scheme == "s3":
        bucket = parts.netloc
        if bucket not in policy.allowed_buckets:
            raise GuardError(403, f"bucket {bucket!r} is not in the allowed buckets")
        return uri
    if scheme == "file":
        path = parts.path if uri.startswith("file://") else uri
        if uri.startswith("file://") and parts.netloc not in ("", "localhost"):
            raise GuardError(403, f"file URI with a host ({parts.netloc!r}) is not allowed")
        real = os.path.realpath(path)
        for root in policy.allowed_local_roots:
            root_real = os.path.realpath(root)
            if real == root_real or real.startswith(root_real.rstrip("/") + "/"):
                return real
        raise GuardError(403, f"local path {path!r} is outside the allowed roots")
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise GuardError(422, f"URL {uri!r} has no host")
        return uri
    raise GuardError(403, f"reference URI scheme {scheme!r} cannot be read by this server")


def _address_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return _address_is_public(mapped)
        if ip.teredo is not None:
            return False
    return bool(ip.is_global) and not (
        ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_multicast or ip.is_reserved
    )


Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise GuardError(422, f"host {host!r} does not resolve: {err}") from err
    return sorted({info[4][0] for info in infos})


def _pinned_address(host: str, port: int, policy: UriPolicyConfig, resolver: Resolver) -> str:
    """Resolve once, check every address, and return the one to connect to."""
    addresses = resolver(host, port)
    if not addresses:
        raise GuardError(422, f"host {host!r} does not resolve")
    if host in policy.private_hosts_allowed:
        return addresses[0]
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        if not _address_is_public(ip):
            raise GuardError(
                403,
                f"host {host!r} resolves to {ip}, a loopback, private, link-local or "
                "reserved address: the server does not fetch from there",
            )
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        # Connect to the checked address; the certificate is still checked for the host.
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_http(
    url: str,
    policy: UriPolicyConfig,
    max_bytes: int,
    resolver: Resolver = system_resolver,
) -> Fetched:
    """GET ``url`` without ever connecting to a non-public address.

    The host is resolved once per hop and the connection goes to the address that
    was checked (a second, rebinding answer from DNS is never used); redirects are
    followed by hand, each hop checked again; the body is capped at ``max_bytes``.
    """
    allowed = tuple(s.lower() for s in policy.allowed_schemes)
    for _hop in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or scheme not in allowed:
            raise GuardError(403, f"URL scheme {scheme!r} is not allowed ({url!r})")
        host = parts.hostname
        if not host:
            raise GuardError(422, f"URL {url!r} has no host")
        port = parts.port or (443 if scheme == "https" else 80)
        address = _pinned_address(host, port, policy, resolver)
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, address, policy.http_timeout_s)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            conn.request("GET", target, headers={"User-Agent": "duet-serve", "Host": parts.netloc})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise GuardError(422, f"redirect from {url!r} without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise GuardError(422, f"fetching {url!r} answered HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise GuardError(413, f"{url!r} is {int(length)} bytes; the limit is {max_bytes}")
            data = response.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise GuardError(413, f"{url!r} is larger than the limit of {max_bytes} bytes")
            return Fetched(data=data, final_url=url)
        except (OSError, http.client.HTTPException) as err:
            raise GuardError(422, f"could not fetch {url!r}: {err}") from err
        finally:
            conn.close()
    raise GuardError(422, f"more than {policy.max_redirects} redirects fetching the reference")


def read_reference_bytes(
    uri: str, policy: UriPolicyConfig, max_bytes: int, resolver: Resolver = system_resolver
) -> bytes:
    """The bytes of a reference URI that passed :func:`check_reference_uri`."""
    checked = check_reference_uri(uri, policy)
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else "file"
    if scheme in ("http", "https"):
        return fetch_http(checked, policy, max_bytes, resolver).data
    try:
        size = storage.size(checked)
    except (FileNotFoundError, storage.StorageError) as err:
        raise GuardError(422, f"reference {uri!r} cannot be read: {err}") from err
    if size > max_bytes:
        raise GuardError(413, f"reference {uri!r} is {size} bytes; the limit is {max_bytes}")
    return storage.read_bytes(checked)


# -- media probing -----------------------------------------------------------------

KINDS = ("images", "videos", "audios")


def probe_reference(data: bytes, kind: str, limits: LimitsConfig, name: str = "upload"):
    """Decode an upload as the media it claims to be, within the limits.

    Returns ``(H, W, 3) uint8`` for an image, and for video or audio the checked
    bytes' probe (:class:`core.media.MediaInfo`); anything that does not decode as
    that kind of media is refused with 415.
    """
    if len(data) > limits.max_upload_bytes:
        raise GuardError(
            413, f"{name} is {len(data)} bytes; the limit is {limits.max_upload_bytes}"
        )
    if not data:
        raise GuardError(422, f"{name} is empty")
    if kind == "images":
        return _probe_image(data, limits, name)
    if kind not in ("videos", "audios"):
        raise GuardError(422, f"unknown reference kind {kind!r}")
    from core.media import MediaError, probe_media

    with tempfile.NamedTemporaryFile(suffix=".media") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            info = probe_media(tmp.name, check_frame_rate=False)
        except (MediaError, ValueError, OSError) as err:
            raise GuardError(415, f"{name} is not a readable {kind[:-1]} file: {err}") from err
    if kind == "videos":
        if not info.has_video or info.width <= 0:
            raise GuardError(415, f"{name} has no video stream")
        if info.width * info.height > limits.max_reference_pixels:
            raise GuardError(413, f"{name} is {info.width}x{info.height}: too many pixels")
    elif not info.has_audio:
        raise GuardError(415, f"{name} has no audio stream")
    if info.duration_s > limits.max_reference_seconds:
        raise GuardError(
            413,
            f"{name} lasts {info.duration_s:.1f} s; the limit is {limits.max_reference_seconds} s",
        )
    return info


def _probe_image(data: bytes, limits: LimitsConfig, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(BytesIO(data)) as img:
            if img.width * img.height > limits.max_reference_pixels:
                raise GuardError(413, f"{name} is {img.width}x{img.height}: too many pixels")
            img.load()
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except GuardError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise GuardError(415, f"{name} is not a readable image: {err}") from err


def is_inside(path: str, root: str) -> bool:
    p = PurePosixPath(os.path.normpath(path))
    r = PurePosixPath(os.path.normpath(root))
    return p == r or r in p.parents
