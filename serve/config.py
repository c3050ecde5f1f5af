"""The serving config: one dataclass tree, read by ``core.config`` from TOML or JSON.

``duet serve --config serve.toml`` and ``serve.app:build_app`` (the import path a
KubeRay RayService names) both build the application from a :class:`ServeConfig`.
Every field has a default that runs on a laptop; the defaults of the safety limits
are the product's limits (9 images, 3 videos, 3 audio tracks).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from core.config import ConfigError, config_from_dict, load_config

QUALITIES = ("fast", "full")
# Comma-separated entries added to the configured keys: ``key`` (tenant "default"),
# ``tenant:key``, or ``tenant:key:admin``.
API_KEYS_ENV = "DUET_API_KEYS"
DEFAULT_TENANT = "default"  # the tenant of a bare key (api_keys, or a bare env entry)
UNSUPPORTED_MODES = ("refuse", "full_model")
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ModelDeploymentConfig:
    """One model deployment (``fast`` or ``full``): sampling, scaling and back-pressure."""

    steps: int = 20
    sampler: str = "heun"
    # A checkpoint for this deployment only (a distilled Fast model); None: the app's.
    checkpoint: str | None = None
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    # Metrics are looked at over this window: short windows react faster.
    look_back_period_s: float = 10.0
    # Deprecated by Ray in favour of environment variables, still honoured by 2.60.
    metrics_interval_s: float = 1.0
    max_ongoing_requests: int = 4
    # Requests waiting at each caller for a replica; beyond it the caller gets
    # BackPressureError and the job waits in the ingress's bounded queue.
    max_queued_requests: int = 8
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Dynamic batching of compatible requests (@serve.batch).
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0
    torch_threads: int = 1
    # A request mode this deployment's model was not distilled for (a Fast student
    # has learnt plain text-to-audio-video only: no references, multi-shot or V2V):
    # "refuse" answers 422 with the reason; "full_model" runs it on the Full model at
    # this deployment's step count and says so in the job's metadata.
    unsupported_modes: str = "refuse"

    def validate(self) -> ModelDeploymentConfig:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in ("euler", "heun"):
            raise ValueError(f"sampler must be euler or heun, got {self.sampler!r}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas >= 1, got "
                f"{self.min_replicas}..{self.max_replicas}"
            )
        if self.max_ongoing_requests < 1 or self.max_batch_size < 1:
            raise ValueError("max_ongoing_requests and max_batch_size must be >= 1")
        if self.unsupported_modes not in UNSUPPORTED_MODES:
            raise ValueError(
                f"unsupported_modes must be one of {UNSUPPORTED_MODES}, got {self.unsupported_modes!r}"
            )
        return self


@dataclass
class LimitsConfig:
    """Request limits: anything past them is refused with a 4xx that says which."""

    max_prompt_chars: int = 2000
    max_duration_s: float = 10.0
    max_images: int = 9
    max_videos: int = 3
    max_audios: int = 3
    max_shots: int = 6
    max_upload_bytes: int = 20 * 1024**2  # one uploaded or fetched reference
    max_request_bytes: int = 64 * 1024**2  # a whole request body
    # Reference media (image, video and audio references, the V2V source; uploaded or
    # fetched) are checked before they are decoded -- the header, then a video's
    # packets counted without decoding, an audio track decoded within these limits --
    # and counted again frame by frame when the model replica decodes them, so a few
    # kilobytes declaring a huge canvas or lying about their length are refused
    # (413 naming the limit) and never decoded past it. Per reference.
    max_reference_seconds: float = 30.0
    max_reference_frames: int = 1800  # 30 s at 60 fps
    max_reference_pixels: int = 4096 * 4096  # per image or frame
    max_reference_side: int = 8192  # either dimension, pixels
    # RGB24 of every frame (float32 per audio sample and channel) at the coded size:
    # 30 s of 1080p at 30 fps is 5.6 GB; 30 s of 4K is refused.
    max_reference_decoded_bytes: int = 8 * 1024**3
    max_reference_streams: int = 16  # a phone clip: video, audio and a few metadata
    max_reference_audio_channels: int = 8  # 7.1
    max_reference_sample_rate: int = 192_000
    max_reference_image_frames: int = 1000  # an animated GIF, APNG or WebP
    # Jobs accepted by one ingress replica and not yet finished, per quality; past
    # it a submit gets 429 with Retry-After instead of joining an unbounded queue.
    max_pending_jobs: int = 32
    # Per tenant (defaults for tenants that set none): jobs handed to a model
    # deployment at once, and jobs accepted and waiting for that; past running +
    # queued a submit gets 429 with Retry-After. Counted per ingress replica.
    tenant_max_running_jobs: int = 4
    tenant_max_queued_jobs: int = 16
    retry_after_s: int = 5
    max_seed: int = 2**31 - 1

    def validate(self) -> LimitsConfig:
        for name, value in vars(self).items():
            if name.startswith("max_reference_") and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        return self


@dataclass
class UriPolicyConfig:
    """Which URIs a request may name as references (the server reads them)."""

    allowed_schemes: tuple[str, ...] = ("s3", "https")
    # s3 buckets that may be read; empty: none (s3 refused).
    allowed_buckets: tuple[str, ...] = ()
    # Local roots for file:// and bare paths; empty: no local reads.
    allowed_local_roots: tuple[str, ...] = ()
    # http(s) fetches: hosts must resolve to public addresses (checked per redirect
    # hop, and the connection goes to the address that was checked).
    max_redirects: int = 3
    http_timeout_s: float = 10.0
    # Hosts (exact names) allowed even though they resolve to private addresses:
    # for a company's internal asset server. Empty by default.
    private_hosts_allowed: tuple[str, ...] = ()


@dataclass
class RankConfig:
    """The ``/rank`` page: people judge pairs of candidates of a preference table."""

    # A candidate table (pipelines.align.preferences, e.g. RUN/rlhf/preferences/
    # preferences.parquet); judgements are appended beside it. None: no ranking.
    table_uri: str | None = None
    # Clips are served only from under this folder (None: the table's folder); a
    # candidate whose clip lies elsewhere is not offered.
    media_root: str | None = None
    # One judgement is a few hundred bytes; anything larger is refused unread.
    max_judgement_bytes: int = 4096
    max_clip_bytes: int = 64 * 1024**2


@dataclass
class TenantConfig:
    """One customer of a shared deployment: its keys, its scope and its quotas.

    A tenant's jobs, results and outputs are visible to its own keys only; another
    tenant's key gets 404 for them, as if they did not exist."""

    api_keys: tuple[str, ...] = ()
    # Admin keys read, list and cancel every tenant's jobs (operators); jobs they
    # submit are still this tenant's.
    admin: bool = False
    # None: the limits' tenant_max_running_jobs / tenant_max_queued_jobs.
    max_running_jobs: int | None = None
    max_queued_jobs: int | None = None

    def validate(self) -> TenantConfig:
        for name in ("max_running_jobs", "max_queued_jobs"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "max_running_jobs" else 0):
                raise ValueError(f"{name} must be >= 1 (queued: >= 0), got {value}")
        return self


@dataclass(frozen=True)
class Principal:
    """Who a request is: the tenant its key belongs to, and whether it may see all."""

    tenant: str
    admin: bool = False


@dataclass
class ServeConfig:
    # Checkpoint URI to serve; None: model.checkpoint.default_checkpoint().
    checkpoint: str | None = None
    # With no checkpoint anywhere, serve untrained weights of this preset only if
    # allowed (tests, smoke runs); otherwise starting fails with a clear error.
    random_weights_preset: str | None = None
    # Extra checkpoints by name, chosen per request with "model" (multiplexed).
    models: dict[str, str] = field(default_factory=dict)
    # Where jobs live: state, uploads and outputs (any URI: local or s3://).
    jobs_uri: str = "serve_jobs"
    # Bare keys: each belongs to the tenant "default" (one customer, as before tenancy).
    api_keys: tuple[str, ...] = ()
    # Tenants by name, each with its own keys and quotas ([tenants.brand-a] in TOML).
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    app_name: str = "duet"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.1
    ingress_max_ongoing_requests: int = 64
    ingress_max_queued_requests: int = 64
    # Dispatch: attempts at a job whose replica died while running it before it is
    # failed (a request that reached a dead replica before the job started spends none).
    max_attempts: int = 2
    # A running job whose heartbeat is older than this is treated as orphaned.
    stale_after_s: float = 120.0
    fast: ModelDeploymentConfig = field(
        default_factory=lambda: ModelDeploymentConfig(
            steps=4, sampler="euler", max_replicas=2, target_ongoing_requests=2.0
        )
    )
    full: ModelDeploymentConfig = field(default_factory=ModelDeploymentConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    uri_policy: UriPolicyConfig = field(default_factory=UriPolicyConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    # Estimated price of one CPU- (or GPU-) second, for the cost column of batch results.
    price_per_compute_s: float = 0.0001

    def validate(self) -> ServeConfig:
        # core.config builds nested dataclasses by type hint but leaves dict values
        # as tables: build each tenant here, naming its path in any error.
        tenants = {}
        for name, tenant in (self.tenants or {}).items():
            if not isinstance(name, str) or not _TENANT_NAME.match(name):
                raise ValueError(f"tenant name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
            if not isinstance(tenant, TenantConfig):
                try:
                    tenant = config_from_dict(TenantConfig, tenant, f"tenants.{name}")
                except ConfigError as err:
                    raise ValueError(str(err)) from err
            tenants[name] = tenant
        self.tenants = tenants
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        return self

    def deployment(self, quality: str) -> ModelDeploymentConfig:
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
        return self.fast if quality == "fast" else self.full

    def all_api_keys(self) -> tuple[str, ...]:
        """Every key that may call the API (config, tenants and the environment)."""
        return tuple(self.principals())

    def principals(self) -> dict[str, Principal]:
        """Key -> who it is. A key named twice for different tenants is refused."""
        entries: list[tuple[str, Principal, str]] = []
        for key in self.api_keys:
            entries.append((key, Principal(DEFAULT_TENANT), "api_keys"))
        for name, tenant in self.tenants.items():
            for key in tenant.api_keys:
                entries.append((key, Principal(name, tenant.admin), f"tenants.{name}"))
        for raw in os.environ.get(API_KEYS_ENV, "").split(","):
            if raw.strip():
                key, principal = parse_key_entry(raw.strip())
                entries.append((key, principal, API_KEYS_ENV))
        out: dict[str, Principal] = {}
        for key, principal, where in entries:
            if not key:
                continue
            if key in out and out[key] != principal:
                raise ValueError(
                    f"an API key in {where} is already a key of tenant {out[key].tenant!r}: "
                    "each key belongs to one tenant"
                )
            out[key] = principal
        return out

    def tenant_quota(self, tenant: str) -> tuple[int, int]:
        """``(max running, max queued)`` jobs for a tenant."""
        found = self.tenants.get(tenant)
        running = found.max_running_jobs if found else None
        queued = found.max_queued_jobs if found else None
        return (
            running if running is not None else self.limits.tenant_max_running_jobs,
            queued if queued is not None else self.limits.tenant_max_queued_jobs,
        )


def parse_key_entry(entry: str) -> tuple[str, Principal]:
    """``key`` | ``tenant:key`` | ``tenant:key:admin`` (an env entry) -> key, principal."""
    parts = entry.split(":")
    if len(parts) == 1:
        return parts[0], Principal(DEFAULT_TENANT)
    if len(parts) == 2 or (len(parts) == 3 and parts[2] == "admin"):
        tenant = parts[0]
        if not _TENANT_NAME.match(tenant) or not parts[1]:
            raise ValueError(
                f"{API_KEYS_ENV} entry {tenant!r}:...: expected key, tenant:key or "
                "tenant:key:admin with a tenant of 1-64 letters, digits, '.', '_' or '-'"
            )
        return parts[1], Principal(tenant, admin=len(parts) == 3)
    raise ValueError(
        f"{API_KEYS_ENV} has an entry with {len(parts) - 1} ':' (expected key, tenant:key "
        "or tenant:key:admin)"
    )


def serve_config_from(source: str | dict | ServeConfig | None) -> ServeConfig:
    """A config from a TOML/JSON URI, a dict, an instance, or None (defaults)."""
    if source is None:
        return ServeConfig()
    if isinstance(source, ServeConfig):
        return source
    if isinstance(source, str):
        return load_config(ServeConfig, source)
    return config_from_dict(ServeConfig, source)
