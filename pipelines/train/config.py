"""Training configuration: one dataclass per concern, loaded by :mod:`core.config`.

A run lives under ``run_uri`` (any URI): each stage writes
``RUN/<stage>/checkpoint_<step>/`` while it trains and ``RUN/<stage>/final/`` when it
is done, and records its parent checkpoint, data version and config there. The
stages form a chain: ``vae`` (both VAEs and the vocoder) -> ``pretrain`` (the DiT on
every kept clip) -> ``sft`` (the DiT on the high-quality subset). A stage starts
from its parent's final checkpoint unless ``init_from`` names another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from core.config import config_from_dict, load_config
from model.parallelize import ParallelConfig
from pipelines.align.config import DistillStageConfig, RLHFStageConfig

# rlhf (DanceGRPO) and distill (the Fast student) live in pipelines.align.
STAGES = ("vae", "pretrain", "sft", "rlhf", "distill")
# What ``pipelines.train.train`` runs when no stages are named: the supervised chain.
BASE_STAGES = ("vae", "pretrain", "sft")
PARENT_STAGE = {"vae": None, "pretrain": "vae", "sft": "pretrain", "rlhf": "sft", "distill": "rlhf"}


@dataclass
class DataConfig:
    # Curated dataset root (the manifest is found through core.manifest_layout), or
    # a clips.parquet URI directly.
    curated_uri: str = ""
    split: str = "train"
    # Clip lengths (frames, each 1 + 4k) that batches are bucketed into; a clip goes
    # to the longest bucket it covers and is trimmed to it. Shorter clips are skipped.
    frame_buckets: tuple[int, ...] = (33,)
    # Sources without audio train the video branch only (their audio loss is masked).
    use_video_only: bool = True
    # Pre-encoded latents and text embeddings; "" = RUN/latents. Keyed by the VAE
    # checkpoint's hash, so a retrained VAE never reads stale latents.
    latent_cache_uri: str = ""
    latent_shard_clips: int = 64
    # SFT subset: clips whose quality score is in the top fraction (per manifest
    # score), among clips that also pass every verdict.
    sft_quality_score: str = "sync_confidence"
    sft_top_fraction: float = 0.5
    # With the Ray runner, the driver fills the latent cache with a Ray Data job
    # (``encode_concurrency`` actors) before the workers start; else the workers do.
    encode_with_ray_data: bool = True
    encode_concurrency: int = 1
    # With the Ray runner, the VAE stage's clips are decoded ahead of each step by
    # Ray Data tasks (``decode_cpus`` each, taken from the worker's own CPU share so
    # a full cluster cannot starve them; see pipelines/train/stream.py).
    stream_with_ray_data: bool = True
    decode_cpus: float = 0.5


@dataclass
class ReferenceSampling:
    """How reference slots and multi-shot samples are drawn from the data."""

    # Probability that a sample gets any references at all; then each kind's slot
    # count is uniform in 0..max (0 = absent), up to the model's 9/3/3.
    reference_probability: float = 0.5
    max_images: int = 9
    max_videos: int = 3
    max_audios: int = 3
    # Image slot 0 is the subject: it shows the clip's own first frame with this
    # probability (else it is absent); slots 1.. show first frames of other clips of
    # the source. Subject references in practice show the subject being generated,
    # and a fixed subject slot is what lets the model tell it from the others
    # (see pipelines.train.batches).
    own_frame_probability: float = 0.5
    # Video and audio references are cut to this many video latent steps (at most
    # the model's ref_time_stride, so reference time positions never overlap).
    max_reference_latent_frames: int = 4
    # Fraction of steps that train on two consecutive shots of one source as one
    # multi-shot sequence with per-shot captions.
    multishot_probability: float = 0.2


@dataclass
class StageConfig:
    steps: int = 200
    batch_size: int = 4  # per worker
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 = off
    checkpoint_every: int = 50
    log_every: int = 10


@dataclass
class VAEStageConfig(StageConfig):
    steps: int = 300
    lr: float = 5e-4
    audio_lr: float = 2e-3
    vocoder_steps: int = 0
    window_frames: int = 9
    crop_px: int = 0  # 0 = whole frames
    # With crops: the most moving of this many random crops (1 = uniform). Small
    # moving objects are a few percent of a frame and uniform crops mostly miss them.
    crop_candidates: int = 1
    kl_weight: float = 1e-6
    motion_weight: float = 10.0
    # Held-out clips for PSNR and mel distance.
    eval_clips: int = 4


@dataclass
class DiTStageConfig(StageConfig):
    steps: int = 300
    lr: float = 3e-3
    ema_decay: float = 0.998
    references: ReferenceSampling = field(default_factory=ReferenceSampling)
    # Clip lengths for this stage (empty: data.frame_buckets). SFT may train on
    # longer clips than pretraining (e.g. (33, 49)) where the corpus has them; each
    # set of buckets has its own latent cache.
    frame_buckets: tuple[int, ...] = ()


@dataclass
class TrainConfig:
    preset: str = "tiny"
    run_uri: str = "out/train"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    pretrain: DiTStageConfig = field(default_factory=DiTStageConfig)
    # Fine-tuning continues from trained weights: a lower rate and no warm-up.
    sft: DiTStageConfig = field(
        default_factory=lambda: DiTStageConfig(steps=200, lr=5e-4, warmup_steps=0)
    )
    rlhf: RLHFStageConfig = field(default_factory=RLHFStageConfig)
    distill: DistillStageConfig = field(default_factory=DistillStageConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    keep_checkpoints: int = 2
    # Ray Train: restarts of the worker group after a failure.
    max_failures: int = 2
    # Start a stage from this checkpoint instead of its parent stage's final one.
    init_from: str = ""
    # Fault injection for tests: the worker of this rank kills itself (SIGKILL) when
    # it reaches this step, once per run (a marker in storage says it happened).
    debug_kill_at_step: int = -1
    debug_kill_rank: int = 0
    debug_kill_stage: str = "pretrain"
    # Log which clips every step trained on (samples.jsonl), to audit resumes.
    record_samples: bool = False

    def stage(self, name: str) -> StageConfig | RLHFStageConfig | DistillStageConfig:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; choose one of {STAGES}")
        return getattr(self, name)


def train_config_from(source: str | dict | None) -> TrainConfig:
    """A TrainConfig from a TOML/JSON URI, a dict, or defaults."""
    if source is None:
        return TrainConfig()
    if isinstance(source, dict):
        return config_from_dict(TrainConfig, source)
    return load_config(TrainConfig, source)


def stage_data(cfg: TrainConfig, stage: str) -> DataConfig:
    """The data settings a stage trains on: its own frame buckets where it sets them."""
    buckets = getattr(cfg.stage(stage), "frame_buckets", ())
    return replace(cfg.data, frame_buckets=tuple(buckets)) if buckets else cfg.data
