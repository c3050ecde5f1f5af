"""Starting or joining Ray, the same way for curation and training.

Ray workers do not inherit the driver's environment, so the storage endpoint and
credentials (``AWS_*``) and Duet's own settings (``DUET_*``) are forwarded
explicitly. Ray 2.5x turns on token authentication for a new local cluster when
``RAY_AUTH_MODE`` is unset and warns about it on every start; choosing the same mode
explicitly keeps the protection and drops the warning. A cluster joined by address
keeps whatever mode its operator chose (pass its token in ``RAY_AUTH_TOKEN``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

FORWARDED_ENV_PREFIXES = ("AWS_", "DUET_")
FORWARDED_ENV = ("HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


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


def quiet_ray_environment(local: bool) -> None:
    """Usage statistics off (no route to Ray's collector); auth mode explicit for a local Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray reads the mode when it is imported (its C++ config is cached then): set
    # it only before that, or the driver and the cluster would disagree.
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


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
        ray.init(address=ray_address, **options)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **options)
    return True
