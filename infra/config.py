"""The deployment config: one dataclass tree for the local stack, Prefect and KubeRay.

``make up`` (the local stack), ``duet deploy`` (Prefect deployments) and
``duet manifests`` (the KubeRay YAML under ``infra/kuberay/``) all read the same
:class:`DeployConfig`, from ``infra/duet.toml`` by default, through the one loader
in :mod:`core.config`. A laptop run and a cluster run differ only in what this
config says about where things run, never in hand-copied YAML.

The flows' parameters (:class:`FlowJobConfig`) are the ones a Prefect deployment
schedules and the same ones a KubeRay ``RayJob`` runs (``python -m infra.run_flow``),
so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import config_from_dict, load_config
from serve.config import API_KEYS_ENV, ModelDeploymentConfig, ServeConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = REPO_ROOT / "infra" / "duet.toml"
VARIANTS = ("cpu", "cuda")


@dataclass
class ImageConfig:
    """The container image built by ``infra/Dockerfile`` (one tag per variant)."""

    repository: str = "ghcr.io/duet-ai/duet"
    tag: str = "0.1.0"
    pull_policy: str = "IfNotPresent"
    # Where the project is installed in the image (the Dockerfile's WORKDIR) and
    # where the WhisperX environment is pre-built (DUET_CACHE_DIR at build time).
    workdir: str = "/opt/duet"
    cache_dir: str = "/opt/duet-cache"

    def ref(self, variant: str) -> str:
        if variant not in VARIANTS:
            raise ValueError(f"image variant must be one of {VARIANTS}, got {variant!r}")
        return f"{self.repository}:{self.tag}-{variant}"


@dataclass
class RayConfig:
    """The Ray head: on loopback for the local stack, the KubeRay head service on a cluster."""

    host: str = "127.0.0.1"
    gcs_port: int = 6379
    dashboard_port: int = 8265
    client_port: int = 10001
    serve_port: int = 8000
    # Ports Ray's worker processes take (Ray's defaults); the other ports must lie outside.
    min_worker_port: int = 10002
    max_worker_port: int = 19999
    # CPUs the local head offers (None: all of this machine's).
    num_cpus: int | None = None
    # Token authentication, on as in Ray itself: "token" | "disabled".
    auth_mode: str = "token"
    # KubeRay: the Secret holding the token under key ``auth_token``
    # (RayCluster ``spec.authOptions.secretName``).
    auth_secret: str = "duet-ray-auth"
    # Prefect: the Secret block whose value each flow run gets as RAY_AUTH_TOKEN.
    auth_token_block: str = "duet-ray-auth-token"

    def validate(self) -> RayConfig:
        if self.auth_mode not in ("token", "disabled"):
            raise ValueError(f"auth_mode must be token or disabled, got {self.auth_mode!r}")
        for name in ("gcs_port", "dashboard_port", "client_port", "serve_port"):
            if self.min_worker_port <= getattr(self, name) <= self.max_worker_port:
                raise ValueError(
                    f"{name} {getattr(self, name)} lies in the worker port range "
                    f"{self.min_worker_port}-{self.max_worker_port}"
                )
        return self


@dataclass
class S3Config:
    """Buckets, and the loopback S3 server (moto) the local stack runs in their place."""

    host: str = "127.0.0.1"
    port: int = 5000
    region: str = "us-east-1"
    # The local server accepts any key; a cluster reads real ones from Secrets.
    access_key_id: str = "duet"
    secret_access_key: str = "duet-secret"
    raw_bucket: str = "duet-raw"
    curated_bucket: str = "duet-curated"
    runs_bucket: str = "duet-runs"
    # Prefect flow-run results (JSON) live here.
    results_bucket: str = "duet-prefect"
    # KubeRay: Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL.
    credentials_secret: str = "duet-s3"
    # Prefect Secret blocks holding the same three values for flow-run pods.
    access_key_block: str = "duet-s3-access-key-id"
    secret_key_block: str = "duet-s3-secret-access-key"
    endpoint_block: str = "duet-s3-endpoint-url"

    def buckets(self) -> tuple[str, ...]:
        return (self.raw_bucket, self.curated_bucket, self.runs_bucket, self.results_bucket)


@dataclass
class PrefectConfig:
    host: str = "127.0.0.1"
    port: int = 4200
    # The work pools deployments go to: a process pool on this machine, a
    # Kubernetes pool on a cluster.
    local_work_pool: str = "duet-local"
    cluster_work_pool: str = "duet-k8s"
    # The API URL flow-run pods on the cluster report to.
    cluster_api_url: str = "http://prefect-server.duet.svc.cluster.local:4200/api"
    # Flow-level retries for every deployed run (the flows resume from committed
    # work, so a retry redoes only what did not finish).
    retries: int = 2
    retry_delay_s: int = 300
    # A RemoteFileSystem block at s3://<results_bucket>/results: flow results as JSON.
    results_block: str = "duet-results"


@dataclass
class WorkerGroupConfig:
    """One KubeRay worker group: pod size and autoscaling bounds."""

    name: str = "cpu-curation"
    variant: str = "cpu"
    replicas: int = 0
    min_replicas: int = 0
    max_replicas: int = 1
    cpus: int = 16
    memory_gib: int = 64
    gpus: int = 0
    # Seconds an idle pod of this group lives before the autoscaler removes it.
    idle_timeout_s: int = 120

    def validate(self) -> WorkerGroupConfig:
        if not 0 <= self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"worker group {self.name}: need 0 <= min_replicas <= replicas <= "
                f"max_replicas, got {self.min_replicas}, {self.replicas}, {self.max_replicas}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"worker group {self.name}: variant must be one of {VARIANTS}")
        if self.gpus and self.variant != "cuda":
            raise ValueError(f"worker group {self.name}: GPUs need the cuda image variant")
        return self


@dataclass
class ClusterConfig:
    """The KubeRay RayCluster (and the clusters RayJobs and the RayService create)."""

    name: str = "duet"
    namespace: str = "duet"
    head_cpus: int = 4
    head_memory_gib: int = 16
    # Pending pods at most the cluster's size ("Conservative") or not limited ("Default").
    upscaling_mode: str = "Default"
    cpu_workers: WorkerGroupConfig = field(
        default_factory=lambda: WorkerGroupConfig(
            name="cpu-curation", variant="cpu", replicas=2, min_replicas=0, max_replicas=50,
            cpus=16, memory_gib=64,
        )
    )  # fmt: skip
    gpu_workers: WorkerGroupConfig = field(
        default_factory=lambda: WorkerGroupConfig(
            name="gpu", variant="cuda", replicas=0, min_replicas=0, max_replicas=16,
            cpus=16, memory_gib=128, gpus=1,
        )
    )  # fmt: skip

    def head_service(self) -> str:
        """The head Service KubeRay creates for this cluster."""
        return f"{self.name}-head-svc"

    def validate(self) -> ClusterConfig:
        if self.upscaling_mode not in ("Default", "Aggressive", "Conservative"):
            raise ValueError(f"upscaling_mode {self.upscaling_mode!r} is not a KubeRay mode")
        return self


@dataclass
class FlowJobConfig:
    """A flow run on a schedule: a Prefect deployment and, optionally, a KubeRay RayJob."""

    entrypoint: str = ""
    description: str = ""
    # The flow's parameters for real footage (every file of the day, the settings
    # in the config files shipped in the image). ``ray_address`` is filled per
    # target: the RayCluster's head for Prefect runs, ``auto`` inside a RayJob.
    parameters: dict[str, Any] = field(default_factory=dict)
    # Parameters that differ on the cluster (Prefect's cluster target and RayJobs),
    # applied over ``parameters``.
    cluster_parameters: dict[str, Any] = field(default_factory=dict)
    cron: str = ""
    timezone: str = "UTC"
    # Also emit a RayJob (an ephemeral cluster per run) for this flow.
    ray_job: bool = True
    # RayJob: seconds before KubeRay stops a run that hangs.
    active_deadline_s: int = 6 * 3600


def _curate_job() -> FlowJobConfig:
    return FlowJobConfig(
        entrypoint="flows/curate.py:curate",
        description="Curate the day's raw uploads into a versioned Parquet manifest.",
        parameters={
            # Every file of the day: non-video files are quarantined with their
            # reason; JSON caption sidecars beside videos are read, not curated.
            "input_glob": "s3://duet-raw/incoming/*",
            "out_uri": "s3://duet-curated/nightly",
            # The settings for real footage (served VLM captions when a source has
            # no sidecar), shipped in the image.
            "config_uri": "infra/prefect/curate-nightly.toml",
            "speech": True,
            "speech_workers": 4,
        },
        cron="0 2 * * *",
    )


def _train_job() -> FlowJobConfig:
    return FlowJobConfig(
        entrypoint="flows/train.py:train_flow",
        description="Train vae -> pretrain -> sft on the nightly curated data (resumes).",
        parameters={
            "config_uri": "infra/prefect/train-weekly.toml",
            "runner": "ray",
            "num_workers": 4,
            "use_gpu": True,
        },
        cron="0 6 * * 6",
        active_deadline_s=48 * 3600,
    )


def _adgen_job() -> FlowJobConfig:
    # The bulk ad-variant flow (flows/adgen.py, written with the serving work). On a
    # laptop it starts its own Serve app; on the cluster it sends the variants to the
    # RayService (KubeRay's serve Service for it). Runs pass the API key (api_key).
    return FlowJobConfig(
        entrypoint="flows/adgen.py:adgen",
        description="Expand a brief into ad variants (MP4s + a versioned results table).",
        parameters={
            "brief_uri": "s3://duet-raw/briefs/daily.toml",
            "out_uri": "s3://duet-runs/adgen/daily",
        },
        cluster_parameters={
            "serve_url": "http://duet-serve-serve-svc.duet.svc.cluster.local:8000/",
            "concurrency": 16,
        },
        cron="",
        ray_job=False,
    )


@dataclass
class JobsConfig:
    curate: FlowJobConfig = field(default_factory=_curate_job)
    train: FlowJobConfig = field(default_factory=_train_job)
    adgen: FlowJobConfig = field(default_factory=_adgen_job)

    def items(self) -> list[tuple[str, FlowJobConfig]]:
        return [("curate", self.curate), ("train", self.train), ("adgen", self.adgen)]


@dataclass
class ServiceConfig:
    """The RayService around the Serve application (``serve.app:build_app``)."""

    name: str = "duet-serve"
    import_path: str = "serve.app:build_app"
    # The Secret whose key ``keys`` holds the API keys (comma-separated), given to
    # the application as DUET_API_KEYS.
    api_keys_secret: str = "duet-api-keys"
    # The ServeConfig the application is built from (its autoscaling bounds become
    # the Serve deployments' bounds); one GPU per model replica on a cluster.
    app: ServeConfig = field(
        default_factory=lambda: ServeConfig(
            # The weekly training run's fine-tuned checkpoint (infra/prefect/train-weekly.toml).
            checkpoint="s3://duet-runs/weekly/sft/final",
            jobs_uri="s3://duet-runs/serve-jobs",
            host="0.0.0.0",
            fast=ModelDeploymentConfig(
                steps=4, sampler="euler", min_replicas=1, max_replicas=8, num_gpus=1.0
            ),
            full=ModelDeploymentConfig(min_replicas=1, max_replicas=4, num_gpus=1.0),
        )
    )

    def api_keys_env(self) -> str:
        return API_KEYS_ENV


@dataclass
class DeployConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    s3: S3Config = field(default_factory=S3Config)
    prefect: PrefectConfig = field(default_factory=PrefectConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    # Where ``make up`` keeps its state (pids, ports, logs, the Ray token).
    state_dir: str = ".duet-stack"

    def s3_endpoint(self) -> str:
        return f"http://{self.s3.host}:{self.s3.port}"

    def prefect_api_url(self) -> str:
        return f"http://{self.prefect.host}:{self.prefect.port}/api"

    def ray_address(self) -> str:
        return f"{self.ray.host}:{self.ray.gcs_port}"

    def dashboard_url(self) -> str:
        return f"http://{self.ray.host}:{self.ray.dashboard_port}"


def load_deploy_config(source: str | Path | dict | DeployConfig | None = None) -> DeployConfig:
    """The deploy config from a TOML/JSON URI, a dict, or ``infra/duet.toml``."""
    if isinstance(source, DeployConfig):
        return source
    if isinstance(source, dict):
        return config_from_dict(DeployConfig, source)
    return load_config(DeployConfig, str(source or DEFAULT_CONFIG_PATH))
