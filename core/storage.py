"""URI-addressed storage: local paths, ``file://`` and ``s3://`` through fsspec.

Every path Duet reads or writes goes through here, so a pipeline that runs on a
laptop folder runs unchanged against S3. ``AWS_ENDPOINT_URL`` (or
``DUET_S3_ENDPOINT_URL``) points ``s3://`` at any S3 API server, e.g. MinIO or the
moto server the tests start on loopback.

Atomic writes: on a local filesystem the bytes go to a temp file beside the target
and are renamed over it (rename is atomic within a directory). S3 PUTs are already
all-or-nothing per object, so a reader never sees a half-written object; for
multi-object outputs callers write a commit marker (:func:`write_marker`) last and
readers trust only what a marker covers.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


def _s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("DUET_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict[str, Any] = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
        # s3fs otherwise caches listings across calls, which hides writes made by
        # another process (a resumed flow, a Ray worker) until the cache expires.
    opts["use_listings_cache"] = False
    return opts


_s3_filesystems: dict[tuple, fsspec.AbstractFileSystem] = {}
_s3_lock = threading.Lock()


def _forget_s3_filesystems() -> None:
    """In a forked child: a fresh lock (another thread of the parent may have held it
    at the fork) and no clients of the parent's (its event loop thread is not here)."""
    global _s3_lock
    _s3_lock = threading.Lock()
    _s3_filesystems.clear()


os.register_at_fork(after_in_child=_forget_s3_filesystems)


def _s3_filesystem() -> fsspec.AbstractFileSystem:
    """One S3 filesystem per process and settings, reused by every call.

    A new one per call built a boto session and parsed botocore's service models each
    time: about 0.24 s of CPU per ``exists`` or ``read`` against a loopback server
    (``python -m bench.storage_s3``), which a job store polling S3 pays on every poll.
    Listings are not cached (``use_listings_cache=False``), so reusing the client hides
    no other process's writes. The key is the options and every ``AWS_*`` variable
    (credentials, profile, region, role), so changed settings get a new client.
    """
    options = _s3_options()
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (tuple(sorted(options.items())), aws_env)
    with _s3_lock:
        fs = _s3_filesystems.get(key)
        if fs is None:
            if len(_s3_filesystems) >= 16:  # settings that changed many times: start over
                _s3_filesystems.clear()
            fs = _s3_filesystems[key] = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    return fs


def scheme_of(uri: str) -> str:
    """``s3`` for ``s3://...``, ``file`` for local paths and ``file://``."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def filesystem(uri: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem that serves ``uri``."""
    scheme = scheme_of(uri)
    if scheme == "file":
        return LocalFileSystem(auto_mkdir=True)
    if scheme in ("s3", "s3a"):
        return _s3_filesystem()
    return fsspec.filesystem(scheme)


def strip_scheme(uri: str) -> str:
    """The path part fsspec methods take: no scheme for s3, absolute for local."""
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path))
    return uri.split("://", 1)[1]


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute against this process's working directory.

    Ray Train workers, Prefect tasks and Serve replicas run with working directories
    of their own, so a relative path handed to them names another place (``make
    demo`` once lost its manifest that way). Entry points call this once, in the
    process whose working directory the user meant. ``file://`` keeps its scheme,
    remote URIs (``s3://``) and ``""`` pass unchanged; glob characters are kept.
    """
    if not uri or scheme_of(uri) != "file":
        return uri
    if uri.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(uri[len("file://") :]))
    return os.path.abspath(os.path.expanduser(uri))


def with_scheme(uri_like: str, path: str) -> str:
    """Re-attach ``uri_like``'s scheme to a bare fsspec path."""
    scheme = scheme_of(uri_like)
    if scheme == "file":
        return f"file://{path}" if uri_like.startswith("file://") else path
    return f"{scheme}://{path}"


def join(base: str, *parts: str) -> str:
    """Join URI segments with ``/`` (``os.path.join`` for local paths)."""
    if scheme_of(base) == "file" and not base.startswith("file://"):
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def exists(uri: str) -> bool:
    return filesystem(uri).exists(strip_scheme(uri))


def size(uri: str) -> int:
    try:
        return int(filesystem(uri).size(strip_scheme(uri)))
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: no such file") from err


def read_bytes(uri: str) -> bytes:
    try:
        with filesystem(uri).open(strip_scheme(uri), "rb") as fh:
            return fh.read()
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: no such file") from err


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def makedirs(uri: str) -> None:
    if scheme_of(uri) == "file":
        os.makedirs(strip_scheme(uri), exist_ok=True)
    # Object stores have no directories; prefixes exist once an object does.


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old object or the new one."""
    fs = filesystem(uri)
    path = strip_scheme(uri)
    if scheme_of(uri) == "file":
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    # A single PUT is atomic on S3: the object appears whole or not at all.
    fs.pipe_file(path, data)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays appear in measured results; JSON has no type for them.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local file path holding ``uri``'s bytes (the file itself when it is local)."""
    if scheme_of(uri) == "file":
        path = strip_scheme(uri)
        if not os.path.exists(path):
            raise StorageError(f"{uri}: no such file")
        yield path
        return
    import tempfile

    suffix = os.path.splitext(uri)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(read_bytes(uri))
        tmp.flush()
        yield tmp.name


@contextlib.contextmanager
def local_output(uri: str) -> Iterator[str]:
    """A local path to write into; on exit it is moved to ``uri`` atomically.

    For writers that need a real file (encoders, Parquet writers) but whose target
    may be remote. Nothing reaches ``uri`` if the block raises.
    """
    import tempfile

    suffix = os.path.splitext(uri)[1]
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        if scheme_of(uri) == "file":
            target = strip_scheme(uri)
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            staged = os.path.join(
                os.path.dirname(target) or ".",
                f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex}",
            )
            try:
                import shutil

                shutil.copyfile(tmp, staged)
                os.replace(staged, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(staged)
        else:
            filesystem(uri).put_file(tmp, strip_scheme(uri))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files below ``uri`` (recursively), as URIs, sorted."""
    fs = filesystem(uri)
    root = strip_scheme(uri)
    if not fs.exists(root):
        return []
    if fs.isfile(root):
        found = [root]
    else:
        found = [p for p in fs.find(root) if not posixpath.basename(p).startswith(".")]
    if suffixes:
        found = [p for p in found if p.lower().endswith(tuple(s.lower() for s in suffixes))]
    return sorted(with_scheme(uri, p) for p in found)


def glob(pattern: str) -> list[str]:
    """URIs matching a glob pattern (``s3://bucket/raw/*.mp4``, ``data/**/*.mkv``)."""
    fs = filesystem(pattern)
    matches = fs.glob(strip_scheme(pattern))
    return sorted(with_scheme(pattern, p) for p in matches if fs.isfile(p))


def remove(uri: str, recursive: bool = False) -> None:
    fs = filesystem(uri)
    path = strip_scheme(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


MARKER_NAME = "_COMMITTED.json"


def write_marker(directory_uri: str, payload: dict[str, Any] | None = None) -> str:
    """Mark a multi-object output complete; readers check :func:`is_committed`."""
    marker = join(directory_uri, MARKER_NAME)
    write_json(marker, payload or {})
    return marker


def is_committed(directory_uri: str) -> bool:
    return exists(join(directory_uri, MARKER_NAME))
