"""KubeRay manifests (``ray.io/v1``) generated from the deploy config.

- :func:`raycluster`: the long-running cluster Prefect flow runs join (head with the
  in-tree autoscaler, CPU workers for curation, GPU workers for training/serving);
- :func:`rayjob`: one flow run on an ephemeral cluster of the same shape (``curate``,
  ``train``), whose entrypoint runs the flow with the deployment's parameters;
- :func:`rayservice`: the Serve application, built by ``serve.app:build_app`` from
  the :class:`serve.config.ServeConfig` in the deploy config.

Token authentication: ``spec.authOptions`` (KubeRay >= 1.6) turns it on for every
Ray container and names the Secret that holds the token, so the operator (which
submits RayJobs and polls Serve) and drivers outside the cluster (Prefect flow runs)
use one token. Nothing here is written by hand: ``duet manifests`` renders these
dicts to ``infra/kuberay/*.yaml`` and a test checks the files match.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import shlex
from typing import Any

import yaml

from core.config import config_to_dict
from infra.config import REPO_ROOT, DeployConfig, FlowJobConfig, WorkerGroupConfig

API_VERSION = "ray.io/v1"
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
LABELS = {"app.kubernetes.io/name": "duet", "app.kubernetes.io/part-of": "duet"}


def ray_version() -> str:
    """The Ray version the image installs (the one in this environment)."""
    return importlib.metadata.version("ray")


def flow_run_env(cfg: DeployConfig) -> dict[str, str]:
    """Prefect settings every deployed flow run gets, on the cluster and on a laptop.

    Flow results persist as JSON (never pickle) in the results block on S3; task
    results stay in memory (a task may return a writer object, not data); flow runs
    retry as configured. The same dict goes into the Prefect deployments' job
    variables and the Ray containers of RayJobs (whose entrypoint runs the flow).
    """
    return {
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false",
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"remote-file-system/{cfg.prefect.results_block}",
        "PREFECT_FLOWS_DEFAULT_RETRIES": str(cfg.prefect.retries),
        "PREFECT_FLOWS_DEFAULT_RETRY_DELAY_SECONDS": str(cfg.prefect.retry_delay_s),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def container_env(cfg: DeployConfig) -> list[dict[str, str]]:
    """Environment of every Ray container (credentials come from Secrets, see envFrom)."""
    env = {
        **flow_run_env(cfg),
        "PREFECT_API_URL": cfg.prefect.cluster_api_url,
        # The WhisperX environment is built into the image here.
        "DUET_CACHE_DIR": cfg.image.cache_dir,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def _resources(cpus: int, memory_gib: int, gpus: int = 0) -> dict[str, Any]:
    amount: dict[str, str] = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    # Requests equal limits: Ray schedules by what the pod declares, so a pod must
    # really have it (Guaranteed QoS, no CPU throttling surprises).
    return {"requests": dict(amount), "limits": dict(amount)}


def _container(
    cfg: DeployConfig, name: str, variant: str, resources: dict[str, Any], ports=None
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": cfg.image.ref(variant),
        "imagePullPolicy": cfg.image.pull_policy,
        "workingDir": cfg.image.workdir,
        "resources": resources,
        "env": container_env(cfg),
        "envFrom": [{"secretRef": {"name": cfg.s3.credentials_secret}}],
    }
    if ports:
        container["ports"] = ports
    return container


def _worker_group(cfg: DeployConfig, group: WorkerGroupConfig) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [
            _container(
                cfg,
                WORKER_CONTAINER,
                group.variant,
                _resources(group.cpus, group.memory_gib, group.gpus),
            )
        ]
    }
    if group.gpus:
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "groupName": group.name,
        "replicas": group.replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "idleTimeoutSeconds": group.idle_timeout_s,
        "rayStartParams": {},
        "template": {"metadata": {"labels": dict(LABELS)}, "spec": pod},
    }


def cluster_spec(cfg: DeployConfig) -> dict[str, Any]:
    """A RayClusterSpec: the same shape for the RayCluster, RayJobs and the RayService."""
    c = cfg.cluster
    ports = [
        {"containerPort": cfg.ray.gcs_port, "name": "gcs"},
        {"containerPort": cfg.ray.dashboard_port, "name": "dashboard"},
        {"containerPort": cfg.ray.client_port, "name": "client"},
        {"containerPort": cfg.ray.serve_port, "name": "serve"},
    ]
    head = _container(cfg, HEAD_CONTAINER, "cpu", _resources(c.head_cpus, c.head_memory_gib), ports)
    spec: dict[str, Any] = {
        "rayVersion": ray_version(),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": c.upscaling_mode,
            "idleTimeoutSeconds": min(c.cpu_workers.idle_timeout_s, c.gpu_workers.idle_timeout_s),
        },
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {
                "dashboard-host": "0.0.0.0",
                # The head schedules no work: tasks on it would starve the GCS.
                "num-cpus": "0",
            },
            "template": {"metadata": {"labels": dict(LABELS)}, "spec": {"containers": [head]}},
        },
        "workerGroupSpecs": [
            _worker_group(cfg, c.cpu_workers),
            _worker_group(cfg, c.gpu_workers),
        ],
    }
    if cfg.ray.auth_mode == "token":
        spec["authOptions"] = {"mode": "token", "secretName": cfg.ray.auth_secret}
    return spec


def _metadata(cfg: DeployConfig, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.cluster.namespace, "labels": dict(LABELS)}


def raycluster(cfg: DeployConfig) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(cfg, cfg.cluster.name),
        "spec": cluster_spec(cfg),
    }


@functools.cache
def flow_parameter_names(entrypoint: str) -> frozenset[str]:
    """The parameters of the flow at ``entrypoint``, read from its source (no import)."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    path, _, func = entrypoint.partition(":")
    schema = parameter_schema_from_entrypoint(f"{REPO_ROOT / path}:{func}")
    return frozenset(schema.properties)


def flow_parameters(
    cfg: DeployConfig, job: FlowJobConfig, ray_address: str, cluster: bool = True
) -> dict[str, Any]:
    """A job's flow parameters where it runs: the cluster's over the base ones, and the
    Ray address (if the flow takes one)."""
    params = {**job.parameters, **(job.cluster_parameters if cluster else {})}
    if "ray_address" in flow_parameter_names(job.entrypoint):
        params["ray_address"] = ray_address
    return params


def rayjob_entrypoint(cfg: DeployConfig, job: FlowJobConfig) -> str:
    """The command a RayJob runs on its head: the flow, with the deployment's parameters.

    ``ray_address="auto"``: inside a Ray job the driver finds its cluster through
    ``RAY_ADDRESS``, and the token through the auth env KubeRay sets.
    """
    params = json.dumps(flow_parameters(cfg, job, "auto"), sort_keys=True)
    return shlex.join(["python", "-m", "infra.run_flow", job.entrypoint, "--parameters", params])


def rayjob(cfg: DeployConfig, name: str, job: FlowJobConfig) -> dict[str, Any]:
    meta = _metadata(cfg, f"{cfg.cluster.name}-{name}")
    # A RayJob runs once; `kubectl create` makes a new one per run from generateName.
    meta["generateName"] = meta.pop("name") + "-"
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": meta,
        "spec": {
            "entrypoint": rayjob_entrypoint(cfg, job),
            "rayClusterSpec": cluster_spec(cfg),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": job.active_deadline_s,
            # Retries happen inside the flow (Prefect flow retries resume from
            # committed work), not by building a new cluster.
            "backoffLimit": 0,
            "submissionMode": "K8sJobMode",
        },
    }


def serve_app_args(cfg: DeployConfig) -> dict[str, Any]:
    """What ``serve.app:build_app`` receives: the ServeConfig as plain (JSON) data."""
    return {"config": json.loads(json.dumps(config_to_dict(cfg.service.app)))}


def serve_config_v2(cfg: DeployConfig) -> dict[str, Any]:
    app = cfg.service.app
    return {
        "http_options": {"host": "0.0.0.0", "port": cfg.ray.serve_port},
        "applications": [
            {
                "name": app.app_name,
                "import_path": cfg.service.import_path,
                "route_prefix": app.route_prefix,
                "args": serve_app_args(cfg),
            }
        ],
    }


def rayservice(cfg: DeployConfig) -> dict[str, Any]:
    spec = cluster_spec(cfg)
    api_keys = {
        "name": cfg.service.api_keys_env(),
        "valueFrom": {"secretKeyRef": {"name": cfg.service.api_keys_secret, "key": "keys"}},
    }
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            container["env"].append(dict(api_keys))
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(cfg, cfg.service.name),
        "spec": {
            # KubeRay takes the Serve config as a YAML string.
            "serveConfigV2": yaml.safe_dump(serve_config_v2(cfg), sort_keys=False),
            "rayClusterConfig": spec,
        },
    }


def manifests(cfg: DeployConfig) -> dict[str, dict[str, Any]]:
    """File name -> manifest, for everything under ``infra/kuberay/``."""
    out = {"raycluster.yaml": raycluster(cfg), "rayservice.yaml": rayservice(cfg)}
    for name, job in cfg.jobs.items():
        if job.ray_job:
            out[f"rayjob-{name}.yaml"] = rayjob(cfg, name, job)
    return out
