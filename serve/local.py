"""Running the API without Ray: one in-process worker thread per quality.

Same API, same dispatcher, same :class:`serve.worker.ModelWorker` as the Serve
application; only the transport differs (a thread instead of a replica). Used by
the API tests and by ``duet serve --local`` on a machine without Ray.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI

from serve.api import build_api
from serve.config import QUALITIES, ServeConfig
from serve.worker import ModelWorker, allowed_resolutions, model_config_for, served_models


class LocalBackend:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.workers = {q: ModelWorker(config, q, replica=f"local-{q}") for q in QUALITIES}
        self.pools = {q: ThreadPoolExecutor(1, thread_name_prefix=f"duet-{q}") for q in QUALITIES}

    async def run(self, job_id: str, quality: str, model: str) -> dict:
        loop = asyncio.get_running_loop()
        worker = self.workers[quality]
        (result,) = await loop.run_in_executor(
            self.pools[quality], worker.run_jobs, [job_id], model
        )
        return result

    async def ready(self) -> dict[str, bool]:
        return {q: True for q in QUALITIES}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)


def model_facts(config: ServeConfig) -> dict:
    cfg = model_config_for(config)
    return {
        "fps": float(cfg.fps),
        "resolutions": allowed_resolutions(cfg),
        "models": served_models(config),
    }


def build_local_app(config: ServeConfig) -> tuple[FastAPI, LocalBackend]:
    backend = LocalBackend(config)
    return build_api(config, backend, model_facts(config)), backend
