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
from serve.worker import ModelWorker, serving_facts


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
    return serving_facts(config)


def build_local_app(config: ServeConfig) -> tuple[FastAPI, LocalBackend]:
    backend = LocalBackend(config)
    return build_api(config, backend, model_facts(config)), backend


class ServerThread:
    """Uvicorn serving an app on a thread (tests, the browser test, ``duet serve --local``)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.url = f"http://{host}:{port}/"
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = None

    def __enter__(self) -> ServerThread:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the API server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
