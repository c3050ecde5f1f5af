"""The serving config: one dataclass tree, read by ``core.config`` from TOML or JSON.

``duet serve --config serve.toml`` and ``serve.app:build_app`` (the import path a
KubeRay RayService names) both build the application from a :class:`ServeConfig`.
Every field has a default that runs on a laptop; the defaults of the safety limits
are the product's limits (9 images, 3 videos, 3 audio tracks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from core.config import config_from_dict, load_config

QUALITIES = ("fast", "full")
API_KEYS_ENV = "DUET_API_KEYS"  # comma-separated keys, added to the configured ones


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
    max_reference_seconds: float = 30.0
    max_reference_pixels: int = 4096 * 4096
    # Jobs accepted by one ingress replica and not yet finished, per quality; past
    # it a submit gets 429 with Retry-After instead of joining an unbounded queue.
    max_pending_jobs: int = 32
    retry_after_s: int = 5
    max_seed: int = 2**31 - 1


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
    api_keys: tuple[str, ...] = ()
    app_name: str = "duet"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.1
    ingress_max_ongoing_requests: int = 64
    ingress_max_queued_requests: int = 64
    # Dispatch: how often a job whose replica died is retried before it is failed.
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
    # Estimated price of one CPU- (or GPU-) second, for the cost column of batch results.
    price_per_compute_s: float = 0.0001

    def validate(self) -> ServeConfig:
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
        extra = tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
        return tuple(k for k in self.api_keys if k) + extra


def serve_config_from(source: str | dict | ServeConfig | None) -> ServeConfig:
    """A config from a TOML/JSON URI, a dict, an instance, or None (defaults)."""
    if source is None:
        return ServeConfig()
    if isinstance(source, ServeConfig):
        return source
    if isinstance(source, str):
        return load_config(ServeConfig, source)
    return config_from_dict(ServeConfig, source)
