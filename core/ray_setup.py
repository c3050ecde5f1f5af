"""Starting or joining Ray, the same way for curation and training.

Ray workers do not inherit the driver's environment, so the storage endpoint and
credentials (``AWS_*``) and Duet's own settings (``DUET_*``) are forwarded
explicitly. Ray 2.5x turns on token authentication for a new local cluster when
``RAY_AUTH_MODE`` is unset and warns about it on every start; choosing the same mode
explicitly keeps the protection and drops the warning.

Joining a cluster by address: Ray itself sends its token only when the address is
``auto`` (a cluster found on this machine); given ``HOST:PORT`` or ``ray://...`` it
sends none unless ``RAY_AUTH_MODE=token`` is set, and a token-protected cluster
(every ``ray start --head`` since Ray 2.52) answers ``InvalidAuthToken`` while the
driver retries for a minute. So when a token is available, from Ray's own sources in
Ray's order (``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``), a driver joining by address turns token mode on. A cluster
without authentication ignores the token; ``RAY_AUTH_MODE=disabled`` opts out. The
token is never copied into a job's runtime environment (the cluster's nodes have it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

FORWARDED_ENV_PREFIXES = ("AWS_", "DUET_")
FORWARDED_ENV = ("HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# Ray's words when its raylet did not register with the GCS within a fixed 30 s: on a
# machine busy with other work that can pass, and a later start usually succeeds (CI
# once saw two misses in a row while the other test worker trained).
RAY_NODE_STARTUP_TIMEOUT = "timed out during startup"
LOCAL_START_ATTEMPTS = 3


class RayAuthError(RuntimeError):
    """Token authentication is asked for but no usable token is configured."""


def forwarded_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV
    }
    # No code downloads weights at run time: the text encoder loads from its package.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def default_token_path() -> Path:
    """Where ``ray get-auth-token --generate`` and a new local cluster keep the token."""
    return Path.home() / ".ray" / "auth_token"


def auth_token_source() -> str | None:
    """Which of Ray's token sources holds a token (Ray's precedence), or None.

    A ``RAY_AUTH_TOKEN_PATH`` that names a missing or empty file is an error, as it
    is for Ray: falling back to another token would hide the misconfiguration.
    """
    if os.environ.get(AUTH_TOKEN_ENV, "").strip():
        return AUTH_TOKEN_ENV
    path = os.environ.get(AUTH_TOKEN_PATH_ENV)
    if path:
        token_file = Path(path).expanduser()
        if not token_file.is_file() or not token_file.read_text().strip():
            raise RayAuthError(f"{AUTH_TOKEN_PATH_ENV}={path}: no token in that file")
        return AUTH_TOKEN_PATH_ENV
    if default_token_path().is_file() and default_token_path().read_text().strip():
        return str(default_token_path())
    return None


def join_auth_mode() -> str | None:
    """The auth mode a driver joining a cluster by address should use (None: Ray's default).

    An explicit ``RAY_AUTH_MODE`` is kept, but ``token`` without any token fails here
    with a clear message instead of Ray's minute of retries.
    """
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None:
        if mode.lower() == "token" and auth_token_source() is None:
            raise RayAuthError(
                f"{AUTH_MODE_ENV}=token but no token: set {AUTH_TOKEN_ENV}, or "
                f"{AUTH_TOKEN_PATH_ENV} to the cluster's token file "
                "(`make up` prints it; on KubeRay it is the cluster's auth Secret)"
            )
        return mode.lower()
    return "token" if auth_token_source() is not None else None


def quiet_ray_environment(local: bool) -> None:
    """Usage statistics off (no route to Ray's collector); the auth mode made explicit.

    A local Ray gets token mode (Ray's own default, without its warning); a driver
    joining by address gets token mode when a token is available (see the module
    docstring).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:
        # Ray reads the mode when it is imported (its C++ config is cached then): set
        # it only before that, or the driver and the cluster would disagree.
        if "ray" not in sys.modules:
            os.environ.setdefault(AUTH_MODE_ENV, "token")
        return
    if os.environ.get(AUTH_MODE_ENV) is None and join_auth_mode() == "token":
        os.environ[AUTH_MODE_ENV] = "token"
        if "ray" in sys.modules:
            # Ray already cached its config at import: refresh it, as Ray does itself
            # when it turns token mode on for a cluster found with ``auto``.
            from ray._raylet import Config

            Config.initialize("")


class ClusterUnreachableError(ConnectionError):
    """The Ray cluster the user named does not answer (or refused this driver)."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing listens at ``address``: Ray itself retries an
    absent head for minutes before it gives up with a timeout deep in its logs."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterUnreachableError(
            f"no Ray cluster answers at {address} ({err.strerror or err}): start one "
            "(`make up`, or `ray start --head`) or leave out --ray-address to use a local Ray"
        ) from err


def init_ray(
    ray_address: str | None, num_cpus: int | None = None, log_to_driver: bool = False
) -> bool:
    """Connect to ``ray_address`` or start a local Ray; True when this call started it."""
    quiet_ray_environment(local=not ray_address)
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "ignore_reinit_error": True,
        "log_to_driver": log_to_driver,
        "runtime_env": {"env_vars": forwarded_env()},
    }
    if ray_address:
        check_reachable(ray_address)
        try:
            ray.init(address=ray_address, **options)
        except ConnectionError as err:
            # Ray reports a cluster that refused the driver's token, or its lack of one
            # (InvalidAuthToken in its log), only as a failed connection; say what to set.
            if os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
                used = f"this driver sent the token from {auth_token_source()}"
            else:
                used = "this driver sent no token"
            raise ClusterUnreachableError(
                f"{err}. If the cluster uses token authentication (on by default since "
                f"Ray 2.52), {used}: set {AUTH_TOKEN_ENV} or {AUTH_TOKEN_PATH_ENV} to the "
                "cluster's token (for `make up`: source .duet-stack/env.sh)"
            ) from err
    else:
        # "local", not None: with no address Ray joins the newest cluster that `ray start`
        # left on this machine (a `make up` stack, another test's head), where
        # ``num_cpus`` is refused and the work would land on someone else's cluster.
        # RAY_ADDRESS, Ray's own way to name a cluster, is still honoured.
        address = os.environ.get("RAY_ADDRESS") or "local"
        local = {"num_cpus": num_cpus, "include_dashboard": False} if address == "local" else {}
        _start_local(ray, {"address": address, **local, **options})
    return True


def _start_local(ray, init_kwargs: dict[str, Any]) -> None:
    """``ray.init`` for a local cluster, once more if its node timed out starting."""
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        before = _child_pids()
        try:
            ray.init(**init_kwargs)
            return
        except Exception as err:  # Ray raises a bare Exception for this one
            if attempt == LOCAL_START_ATTEMPTS or RAY_NODE_STARTUP_TIMEOUT not in str(err):
                raise
            print(
                "local Ray timed out starting its node (busy machine?): starting it again",
                file=sys.stderr,
            )
            # The failed attempt's GCS and raylet are this driver's children; a second
            # cluster beside them would compete for the same cores.
            _stop_pids(_child_pids() - before)
            with contextlib.suppress(Exception):
                ray.shutdown()


def process_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, pgid) of every process visible in /proc (Linux); a
    process that exits while it is read is left out."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def _child_pids() -> set[int]:
    """Live children of this process (Ray's local processes are started as such)."""
    me = os.getpid()
    return {pid for pid, (state, ppid, _) in process_table().items() if ppid == me and state != "Z"}


def _stop_pids(pids: set[int], grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for pid in pids:  # reap only our own: other children belong to others
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            if not (pids & _child_pids()):
                return
            time.sleep(0.1)
