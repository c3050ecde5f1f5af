"""Prefect deployments of Duet's flows, from the deploy config.

One spec per flow (``curate``, ``train``, and ``adgen`` once ``flows/adgen.py``
exists): its work pool, the flow's parameters for real footage, its schedule, the
environment every run gets (flow retries, results as JSON in S3, the Ray token and
S3 credentials as Secret-block references) and where the code is. Two targets:

- ``local``: a process work pool on this machine, the code in this checkout, Ray at
  the local stack's head; schedules registered but paused (a laptop does not curate
  at 2 am unless asked to);
- ``cluster``: a Kubernetes work pool, the code in the image, Ray at the
  RayCluster's head service.

:func:`register` creates the pool, the blocks it can fill and the deployments
through Prefect's API. Secret-block references such as
``{{ prefect.blocks.secret.duet-ray-auth-token }}`` stay references in the
deployment and are resolved by the worker when a run starts, so the token is never
stored in a deployment. (``prefect deploy`` on ``infra/prefect/prefect.yaml`` would
resolve them at deploy time; use ``duet deploy``.)
"""

from __future__ import annotations

from typing import Any

from infra.config import REPO_ROOT, DeployConfig, FlowJobConfig
from infra.kuberay import flow_parameters, flow_run_env

TARGETS = ("local", "cluster")
DEPLOYMENT_NAMES = {"curate": "nightly", "train": "weekly", "adgen": "daily"}


def secret_ref(block: str) -> str:
    return "{{ prefect.blocks.secret." + block + " }}"


def entrypoint_exists(job: FlowJobConfig) -> bool:
    return (REPO_ROOT / job.entrypoint.partition(":")[0]).is_file()


def ray_address_for(cfg: DeployConfig, target: str) -> str:
    """Where a deployed flow run joins Ray: the local head, or the RayCluster's client port."""
    if target == "local":
        return cfg.ray_address()
    return f"ray://{cfg.cluster.head_service()}:{cfg.ray.client_port}"


def run_env(cfg: DeployConfig) -> dict[str, str]:
    """The environment of every deployed flow run (both targets)."""
    env = {
        **flow_run_env(cfg),
        "AWS_ACCESS_KEY_ID": secret_ref(cfg.s3.access_key_block),
        "AWS_SECRET_ACCESS_KEY": secret_ref(cfg.s3.secret_key_block),
        "AWS_ENDPOINT_URL": secret_ref(cfg.s3.endpoint_block),
        "AWS_DEFAULT_REGION": cfg.s3.region,
    }
    if cfg.ray.auth_mode == "token":
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = secret_ref(cfg.ray.auth_token_block)
    return env


def deployment_specs(cfg: DeployConfig, target: str) -> list[dict[str, Any]]:
    """prefect.yaml-shaped deployment dicts for ``target`` (flows whose file exists)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    workdir = str(REPO_ROOT) if target == "local" else cfg.image.workdir
    specs = []
    for key, job in cfg.jobs.items():
        if not entrypoint_exists(job):
            continue
        job_variables: dict[str, Any] = {"env": run_env(cfg)}
        if target == "cluster":
            job_variables.update(
                image=cfg.image.ref("cpu"),
                namespace=cfg.cluster.namespace,
                image_pull_policy=cfg.image.pull_policy,
            )
        spec: dict[str, Any] = {
            "name": DEPLOYMENT_NAMES[key],
            "flow": key,
            "description": job.description,
            "entrypoint": job.entrypoint,
            "tags": ["duet", key],
            "parameters": flow_parameters(
                cfg, job, ray_address_for(cfg, target), cluster=target == "cluster"
            ),
            "work_pool": {
                "name": (
                    cfg.prefect.local_work_pool
                    if target == "local"
                    else cfg.prefect.cluster_work_pool
                ),
                "job_variables": job_variables,
            },
            "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}],
            "schedules": (
                [{"cron": job.cron, "timezone": job.timezone, "active": target == "cluster"}]
                if job.cron
                else []
            ),
            "enforce_parameter_schema": True,
        }
        specs.append(spec)
    return specs


def prefect_yaml(cfg: DeployConfig) -> dict[str, Any]:
    """The cluster deployments as a prefect.yaml document (rendered for review)."""
    import prefect

    specs = deployment_specs(cfg, "cluster")
    for spec in specs:
        spec.pop("flow")
    return {"name": "duet", "prefect-version": prefect.__version__, "deployments": specs}


def flow_name(entrypoint: str) -> str:
    """The flow's Prefect name (its decorator's ``name=``, else the function name)."""
    from prefect.flows import load_flow_arguments_from_entrypoint

    path, _, func = entrypoint.partition(":")
    args = load_flow_arguments_from_entrypoint(f"{REPO_ROOT / path}:{func}", {"name"})
    return args.get("name") or func.replace("_", "-")


async def _ensure_work_pool(client, name: str, pool_type: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    try:
        await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
    except ObjectAlreadyExists:
        pass


async def register(
    cfg: DeployConfig,
    target: str,
    secrets: dict[str, str] | None = None,
) -> dict[str, str]:
    """Create the work pool, results block, given secret blocks and deployments.

    ``secrets``: block name -> value, for the blocks this caller knows (the local
    stack knows its token and S3 credentials; on a cluster they are created once
    by an operator, see infra/README.md). Uses the API in ``PREFECT_API_URL``.
    Returns deployment full name -> id.
    """
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.filesystems import RemoteFileSystem
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    specs = deployment_specs(cfg, target)
    pool_type = "process" if target == "local" else "kubernetes"
    for name, value in (secrets or {}).items():
        await Secret(value=value).save(name, overwrite=True)
    await RemoteFileSystem(basepath=f"s3://{cfg.s3.results_bucket}/results").save(
        cfg.prefect.results_block, overwrite=True
    )
    ids = {}
    async with get_client() as client:
        await _ensure_work_pool(client, specs[0]["work_pool"]["name"], pool_type)
        for spec in specs:
            path, _, func = spec["entrypoint"].partition(":")
            schema = parameter_schema_from_entrypoint(f"{REPO_ROOT / path}:{func}")
            name = flow_name(spec["entrypoint"])
            flow_id = await client.create_flow_from_name(name)
            deployment_id = await client.create_deployment(
                flow_id=flow_id,
                name=spec["name"],
                description=spec["description"],
                entrypoint=spec["entrypoint"],
                path=spec["pull"][0]["prefect.deployments.steps.set_working_directory"][
                    "directory"
                ],
                tags=spec["tags"],
                parameters=spec["parameters"],
                parameter_openapi_schema=schema.model_dump_for_openapi(),
                work_pool_name=spec["work_pool"]["name"],
                job_variables=spec["work_pool"]["job_variables"],
                pull_steps=spec["pull"],
                enforce_parameter_schema=spec["enforce_parameter_schema"],
                schedules=[
                    DeploymentScheduleCreate(
                        schedule=CronSchedule(cron=s["cron"], timezone=s["timezone"]),
                        active=s["active"],
                    )
                    for s in spec["schedules"]
                ],
            )
            ids[f"{name}/{spec['name']}"] = str(deployment_id)
    return ids
