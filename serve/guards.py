"""What keeps the API safe to expose: keys, URI policy, SSRF-safe fetches, media probing,
output names.

Every check raises :class:`GuardError` carrying the HTTP status and a message that
says what was refused and why; the API turns it into that response.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import ipaddress
import os
import re
import socket
import ssl
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import numpy as np

from core import storage
from serve.config import LimitsConfig, Principal, UriPolicyConfig

if TYPE_CHECKING:
    from core.media import MediaLimits


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


def resolve_key(provided: str | None, principals: dict[str, Principal]) -> Principal | None:
    """Who ``provided`` is (None: nobody). Every configured key is compared in constant
    time with no early exit, as in :func:`api_key_matches`."""
    if not provided or not principals:
        return None
    given = provided.encode("utf-8")
    found: Principal | None = None
    for key, principal in principals.items():
        if hmac.compare_digest(given, key.encode("utf-8")):
            found = principal
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


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: the IPv4 is the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64: any mapping
_INET_ATON_PART = re.compile(r"^(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")


def parse_ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address written any way ``inet_aton`` reads one (``127.1``, ``0177.0.0.1``,
    ``0x7f.0.0.1``, ``2130706433``), or None when ``host`` is a name.

    Resolvers and HTTP clients connect to these forms, so the guard must read them
    itself rather than trust that a name lookup turns them into a checkable address.
    """
    parts = host.rstrip(".").split(".") if host else []
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.match(p) for p in parts):
        return None
    values = []
    for part in parts:
        if part[:2].lower() == "0x":
            values.append(int(part[2:], 16))
        elif len(part) > 1 and part.startswith("0"):
            values.append(int(part[1:], 8))
        else:
            values.append(int(part))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise GuardError(422, f"host {host!r} is not a valid IPv4 address")
    number = 0
    for v in head:
        number = number * 256 + v
    return ipaddress.IPv4Address((number << (8 * (4 - len(head)))) | last)


def address_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for a globally routed unicast address. IPv6 forms that carry an IPv4
    address (IPv4-mapped, 6to4, NAT64) are judged by that address; Teredo and
    local-use NAT64, whose far end cannot be checked, are refused."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None or ip in _NAT64_LOCAL:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_is_public(embedded)
    return bool(ip.is_global) and not (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally (any IPv4 form, IPv6 with or without a zone)."""
    v4 = parse_ipv4_literal(host)
    if v4 is not None:
        return v4
    try:
        return ipaddress.IPv6Address(host.split("%", 1)[0]) if ":" in host else None
    except ValueError as err:
        raise GuardError(422, f"host {host!r} is not a valid IPv6 address") from err


Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise GuardError(422, f"host {host!r} does not resolve: {err}") from err
    return sorted({info[4][0] for info in infos})


def _pinned_address(host: str, port: int, policy: UriPolicyConfig, resolver: Resolver) -> str:
    """Resolve once, check every address, and return the one to connect to.

    A host written as an address (in any of its spellings) is checked as that
    address without asking a resolver."""
    literal = literal_address(host)
    addresses = [str(literal)] if literal is not None else resolver(host, port)
    if not addresses:
        raise GuardError(422, f"host {host!r} does not resolve")
    if host in policy.private_hosts_allowed:
        return addresses[0]
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        if not address_is_public(ip):
            raise GuardError(
                403,
                f"host {host!r} is {ip}, a loopback, private, link-local or reserved "
                "address: the server does not fetch from there",
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

# core.media.MediaLimits field -> the serve config's limit (what a refusal names).
_LIMIT_NAMES = {
    "max_seconds": "max_reference_seconds",
    "max_frames": "max_reference_frames",
    "max_pixels": "max_reference_pixels",
    "max_side": "max_reference_side",
    "max_decoded_bytes": "max_reference_decoded_bytes",
    "max_streams": "max_reference_streams",
    "max_channels": "max_reference_audio_channels",
    "max_sample_rate": "max_reference_sample_rate",
}


def media_limits(limits: LimitsConfig) -> MediaLimits:
    """The configured reference limits as :class:`core.media.MediaLimits`."""
    from core.media import MediaLimits

    return MediaLimits(**{field: getattr(limits, name) for field, name in _LIMIT_NAMES.items()})


def _over_limit(name: str, limit: str, reason: str, limits: LimitsConfig) -> GuardError:
    return GuardError(413, f"{name}: {reason}; over the limit {limit} = {getattr(limits, limit)}")


@contextlib.contextmanager
def _limit_errors(limits: LimitsConfig, name: str):
    """A :class:`core.media.MediaLimitError` raised inside as a 413 naming the limit."""
    from core.media import MediaLimitError

    try:
        yield
    except MediaLimitError as err:
        raise _over_limit(name, _LIMIT_NAMES[err.limit], err.detail, limits) from err


def probe_reference(data: bytes, kind: str, limits: LimitsConfig, name: str = "upload"):
    """Check an upload or fetched reference as the media it claims to be, within the
    limits, before anything is decoded in full.

    An image is decoded only after its header passed (returns ``(H, W, 3) uint8``).
    Video and audio get their header checked, then their packets counted without
    decoding (a header can understate), then their audio decoded within the limits
    (cheap, and stopped at the limit); returns the probe
    (:class:`core.media.MediaInfo`). Video frames are decoded later by the model
    replica, counted again frame by frame (:func:`read_reference_video`).
    Over a limit: 413 naming it; not that kind of media: 415.
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
    from core.media import (
        MediaError,
        check_media_header,
        decode_audio_within,
        probe_media,
        scan_packets,
    )

    checks = media_limits(limits)
    with tempfile.NamedTemporaryFile(suffix=".media") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            with _limit_errors(limits, name):
                info = probe_media(tmp.name, check_frame_rate=False)
                if kind == "videos" and (not info.has_video or info.width <= 0):
                    raise GuardError(415, f"{name} has no video stream")
                if kind == "audios" and not info.has_audio:
                    raise GuardError(415, f"{name} has no audio stream")
                check_media_header(info, checks)
                scan_packets(tmp.name, checks)
                if info.has_audio:
                    decode_audio_within(tmp.name, checks)
        except (MediaError, ValueError, OSError) as err:
            raise GuardError(415, f"{name} is not a readable {kind[:-1]} file: {err}") from err
    return info


def _image_header(img, limits: LimitsConfig, name: str) -> None:
    """Refuse an opened (not yet decoded) image whose header declares too much."""
    from PIL import ImageMode

    w, h = img.size
    if max(w, h) > limits.max_reference_side:
        raise _over_limit(name, "max_reference_side", f"image is {w}x{h}", limits)
    if w * h > limits.max_reference_pixels:
        raise _over_limit(
            name, "max_reference_pixels", f"image is {w}x{h} = {w * h} pixels", limits
        )
    # The decoded image in its own mode, and its RGB copy.
    mode = ImageMode.getmode(img.mode)
    per_pixel = len(mode.bands) * np.dtype(mode.typestr).itemsize + 3
    if w * h * per_pixel > limits.max_reference_decoded_bytes:
        raise _over_limit(
            name, "max_reference_decoded_bytes",
            f"image {w}x{h} in mode {img.mode} decodes to {w * h * per_pixel} bytes", limits,
        )  # fmt: skip
    # Counting frames walks the file's frame headers (GIF) or reads a header field
    # (APNG, WebP); no frame is decoded. Only the first frame is used.
    frames = int(getattr(img, "n_frames", 1))
    if frames > limits.max_reference_image_frames:
        raise _over_limit(
            name, "max_reference_image_frames", f"animated image has {frames} frames", limits
        )


def _probe_image(data: bytes, limits: LimitsConfig, name: str) -> np.ndarray:
    """The first frame of an image as ``(H, W, 3) uint8``, decoded only after its
    header passed the limits (``Image.open`` reads the header; ``load`` decodes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns past its own pixel ceiling; the limits here decide.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(BytesIO(data))
        with img:
            _image_header(img, limits, name)
            img.load()
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except GuardError:
        raise
    except Image.DecompressionBombError as err:
        # Pillow's own ceiling (twice Image.MAX_IMAGE_PIXELS) fired inside open(),
        # before the header could be looked at here: still a size refusal.
        raise _over_limit(name, "max_reference_pixels", str(err), limits) from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise GuardError(415, f"{name} is not a readable image: {err}") from err


def read_reference_video(uri: str, limits: LimitsConfig, size: tuple[int, int]) -> np.ndarray:
    """A stored reference video's frames ``(T, h, w, 3)`` at ``size=(w, h)``, every
    decoded frame counted against the limits (413 at the first one past them, even
    when the header and packets looked small: a stream can change size mid-way)."""
    from core.media import DecodeBudget, read_video

    with _limit_errors(limits, uri):
        return read_video(uri, size=size, budget=DecodeBudget(media_limits(limits), uri))[0]


def read_reference_audio(uri: str, limits: LimitsConfig, sample_rate: int) -> np.ndarray:
    """A stored reference audio track as stereo ``(2, N)`` float32 at ``sample_rate``,
    decoded within the limits."""
    from core.media import DecodeBudget, read_audio

    budget = DecodeBudget(media_limits(limits), uri)
    with _limit_errors(limits, uri):
        return read_audio(uri, sample_rate=sample_rate, channels=2, budget=budget)[0]


def read_source_clip(uri: str, limits: LimitsConfig, sample_rate: int, size: tuple[int, int]):
    """A stored V2V source as a :class:`core.media.AVClip`, decoded within the limits."""
    from core.media import DecodeBudget, read_clip

    budget = DecodeBudget(media_limits(limits), uri)
    with _limit_errors(limits, uri):
        return read_clip(
            uri, sample_rate=sample_rate, size=size, require_audio=False, budget=budget
        )


def is_inside(path: str, root: str) -> bool:
    p = PurePosixPath(os.path.normpath(path))
    r = PurePosixPath(os.path.normpath(root))
    return p == r or r in p.parents
