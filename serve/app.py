"""The Ray Serve application: a FastAPI ingress composed with ``fast`` and ``full``.

::

    Ingress (FastAPI: API + web page)  --DeploymentHandle-->  fast  (ModelDeployment)
                                       --DeploymentHandle-->  full  (ModelDeployment)

Each model deployment has its own ``autoscaling_config``, ``max_ongoing_requests``,
``max_queued_requests``, health check and dynamic batching (``@serve.batch``); named
extra checkpoints are served by model multiplexing. ``build_app`` is the import path
a RayService or ``serve run`` names (``serve.app:build_app``), with the serve config
(or its URI) as the application's arguments; :func:`run` starts it from Python.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from core.config import config_to_dict
from serve.api import build_api
from serve.config import QUALITIES, ModelDeploymentConfig, ServeConfig, serve_config_from
from serve.dispatch import BackendFull, ReplicaLost
from serve.worker import ModelWorker, load_pipeline, serving_facts

log = logging.getLogger(__name__)


@serve.deployment
class ModelDeployment:
    """Generates clips for stored jobs; one quality (``fast`` or ``full``) per deployment."""

    def __init__(self, config: dict, quality: str):
        self.config = serve_config_from(config)
        self.quality = quality
        context = serve.get_replica_context()
        # The full id is the replica actor's name: an operator (or a test) can find it.
        self.worker = ModelWorker(self.config, quality, replica=context.replica_id.to_full_id_str())
        # Weights and text encoder load before the replica reports healthy.
        self.default = self.worker.pipeline("default")
        deployment = self.config.deployment(quality)
        self._run_batch.set_max_batch_size(deployment.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(deployment.batch_wait_timeout_s)
        self.batches: list[int] = []  # sizes of the batches run, for the benchmark

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        if model_id in ("", "default"):
            return self.default
        return await asyncio.to_thread(load_pipeline, self.config, model_id, self.quality)

    async def run(self, job_id: str) -> dict:
        """Run one stored job; compatible concurrent calls share a batch."""
        model = serve.get_multiplexed_model_id() or "default"
        return await self._run_batch(job_id, model)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _run_batch(self, job_ids: list[str], models: list[str]) -> list[dict]:
        self.batches.append(len(job_ids))
        results: dict[int, dict] = {}
        by_model: dict[str, list[int]] = {}
        for i, model in enumerate(models):
            by_model.setdefault(model, []).append(i)
        for model, indices in by_model.items():
            pipeline = await self.get_model(model)
            ids = [job_ids[i] for i in indices]
            # Off the event loop: health checks and new requests keep being answered.
            outcome = await asyncio.to_thread(self.worker.run_jobs_on, pipeline, ids)
            for i, result in zip(indices, outcome, strict=True):
                results[i] = result
        return [results[i] for i in range(len(job_ids))]

    def batch_sizes(self) -> list[int]:
        return list(self.batches)

    def check_health(self) -> None:
        """Unhealthy (replaced by Serve) when the model is gone or a device error stuck."""
        if self.default is None:
            raise RuntimeError("model not loaded")
        error = self.worker.last_error or ""
        if "CUDA error" in error or "out of memory" in error.lower():
            raise RuntimeError(f"device error in the last batch: {error}")


class ServeBackend:
    """Jobs to the model deployments through their handles; Ray errors mapped to the
    dispatcher's: back-pressure -> :class:`BackendFull`, a dead replica -> :class:`ReplicaLost`."""

    def __init__(self, handles: dict[str, DeploymentHandle], config: ServeConfig):
        self.handles = handles
        self.config = config

    async def run(self, job_id: str, quality: str, model: str) -> dict:
        from ray.exceptions import ActorDiedError, RayError, RayTaskError
        from ray.serve.exceptions import (
            BackPressureError,
            RayServeException,
            ReplicaUnavailableError,
        )

        handle = self.handles[quality].options(multiplexed_model_id=model)
        try:
            return await handle.run.remote(job_id)
        except BackPressureError as err:
            retry = getattr(err, "retry_after_s", None) or self.config.limits.retry_after_s
            raise BackendFull(float(retry), str(err)) from err
        except RayTaskError as err:
            if isinstance(getattr(err, "cause", None), ActorDiedError):
                raise ReplicaLost(_first_line(err.cause)) from err
            raise  # the replica's own code raised: not a lost replica
        except RayError as err:
            # The replica's process died, became unreachable or lost its worker: the
            # dispatcher retries (counting an attempt only if the job had started).
            raise ReplicaLost(_first_line(err)) from err
        except ReplicaUnavailableError as err:
            raise ReplicaLost(_first_line(err)) from err
        except RayServeException as err:
            if isinstance(err.__cause__, ActorDiedError):
                raise ReplicaLost(_first_line(err.__cause__)) from err
            raise

    async def ready(self) -> dict[str, bool]:
        def statuses() -> dict[str, bool]:
            app = serve.get_replica_context().app_name
            deployments = serve.status().applications[app].deployments
            return {q: deployments[q].status == "HEALTHY" for q in QUALITIES if q in deployments}

        return await asyncio.to_thread(statuses)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, facts: dict, fast: DeploymentHandle, full: DeploymentHandle):
        self.config = serve_config_from(config)
        self.backend = ServeBackend({"fast": fast, "full": full}, self.config)
        self.api = build_api(self.config, self.backend, facts)

    def __serve_build_asgi_app__(self):
        return self.api


def _model_options(deployment: ModelDeploymentConfig, name: str) -> dict[str, Any]:
    autoscaling = {
        "min_replicas": deployment.min_replicas,
        "max_replicas": deployment.max_replicas,
        "target_ongoing_requests": deployment.target_ongoing_requests,
        "upscale_delay_s": deployment.upscale_delay_s,
        "downscale_delay_s": deployment.downscale_delay_s,
        "look_back_period_s": deployment.look_back_period_s,
        "metrics_interval_s": deployment.metrics_interval_s,
    }
    if deployment.initial_replicas is not None:
        autoscaling["initial_replicas"] = deployment.initial_replicas
    actor_options: dict[str, Any] = {"num_cpus": deployment.num_cpus}
    if deployment.num_gpus:
        actor_options["num_gpus"] = deployment.num_gpus
    return {
        "name": name,
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "max_queued_requests": deployment.max_queued_requests,
        "health_check_period_s": deployment.health_check_period_s,
        "health_check_timeout_s": deployment.health_check_timeout_s,
        "graceful_shutdown_timeout_s": deployment.graceful_shutdown_timeout_s,
        "ray_actor_options": actor_options,
    }


def model_facts(config: ServeConfig) -> dict:
    return serving_facts(config)


def build_app(args: dict | None = None):
    """The application for ``serve.run`` / ``serve run serve.app:build_app`` / a RayService.

    ``args``: ``{"config": URI}`` (a TOML/JSON file), ``{"config": {...}}``, or the
    config's fields themselves; nothing: the defaults.
    """
    args = dict(args or {})
    source = args.pop("config", None) if "config" in args else (args or None)
    config = serve_config_from(source)
    if not config.all_api_keys():
        raise ValueError(
            "no API keys configured: set api_keys or tenants in the serve config, or DUET_API_KEYS"
        )
    plain = config_to_dict(config)
    fast = ModelDeployment.options(**_model_options(config.fast, "fast")).bind(plain, "fast")
    full = ModelDeployment.options(**_model_options(config.full, "full")).bind(plain, "full")
    ingress = Ingress.options(
        name="ingress",
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        max_queued_requests=config.ingress_max_queued_requests,
        backpressure_config=BackpressureConfig(
            status_code=429, retry_after_s=config.limits.retry_after_s
        ),
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
    )
    return ingress.bind(plain, model_facts(config), fast, full)


def run(
    config: ServeConfig, blocking: bool = False, ray_address: str | None = None, num_cpus=None
) -> str:
    """Start Ray (or join ``ray_address``) and Serve on ``config.host:port``; returns the URL."""
    from core.ray_setup import init_ray

    init_ray(ray_address, num_cpus=num_cpus)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(
        build_app({"config": config_to_dict(config)}),
        name=config.app_name,
        route_prefix=config.route_prefix,
        blocking=blocking,
    )
    return f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/"
