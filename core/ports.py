"""A free TCP port on this machine, for a server started by Duet itself (a loopback S3,
Ray's agents, the demo's web app, torchrun's rendezvous)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at ``host`` now (the OS picks it; another process could
    still take it before the caller binds)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
