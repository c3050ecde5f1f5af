"""Is the Prefect server the flows will report to there? Asked before a flow starts.

Given ``PREFECT_API_URL`` (from the environment or a Prefect profile) that nothing
answers, Prefect retries for half a minute and then fails with a traceback from its
client; without it, a flow runs on a temporary local server Prefect starts itself.
So the address is tried once here, in the style of ``core.ray_setup.check_reachable``,
and an absent server is one line that says what to do.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

API_URL_ENV = "PREFECT_API_URL"


class PrefectUnreachableError(ConnectionError):
    """The Prefect server named by ``PREFECT_API_URL`` does not answer."""


def api_url() -> str | None:
    """The API the flows would use: Prefect's own setting (environment, then profile);
    None means a temporary local server."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check_reachable(timeout_s: float = 5.0, local_fallback: bool = True) -> None:
    """Fail in seconds when nothing listens at the configured Prefect API.

    ``local_fallback``: the command can run on a temporary local server instead
    (flows can; registering deployments cannot, they would vanish with it)."""
    url = api_url()
    if url is None:
        if local_fallback:
            return
        raise PrefectUnreachableError(
            f"{API_URL_ENV} is not set: after `make up`, source .duet-stack/env.sh; for a "
            f"cluster, set it to its Prefect API (e.g. http://HOST:4200/api)"
        )
    parts = urlsplit(url)
    if not parts.hostname:
        return  # not a URL we can try; Prefect reports it itself
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except OSError as err:
        if not local_fallback:
            instead = f"set {API_URL_ENV} to a running server"
        elif os.environ.get(API_URL_ENV):
            instead = f"unset {API_URL_ENV} to run flows on a temporary local server"
        else:  # set in a Prefect profile rather than the environment: unset it there
            instead = (
                f"`prefect config unset {API_URL_ENV}` to run flows on a temporary local server"
            )
        raise PrefectUnreachableError(
            f"no Prefect server answers at {url} ({err.strerror or err}): start the stack "
            f"(`make up`) or {instead}"
        ) from err
