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

from core import storage
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
    # References are taught by role (pipelines.train.reference_pairs): each shares
    # one attribute with the clip (subject appearance, motion, tempo, voice), and
    # the prompt names it with an @-binding ("@image2 subject") with this
    # probability per sample (else the references go unnamed). Slots are drawn in
    # random order so the binding, not the slot, says which reference is which.
    binding_probability: float = 0.8
    shuffle_slots: bool = True
    # Image-to-video as its own mode: with this probability a sample's own first
    # frame fills the I2V slot (the model's last image slot), flagged in the batch
    # (DiTBatch.i2v); role references use the other image slots.
    i2v_probability: float = 0.25
    # Old name of i2v_probability (recipes from before role pairs); wins when set.
    own_frame_probability: float | None = None
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
    # Per-pixel loss weights (model.video_vae.pixel_weights): what moves, and what
    # stands out of its frame's backdrop, moving or not. The standout term is off by
    # default: fine-tuning the shipped VAE with it kept one more magenta in 300 CPU
    # steps but nothing more in 2000 GPU steps (BENCHMARKS.md, session 12).
    motion_weight: float = 10.0
    standout_weight: float = 0.0
    # Probability that a training window's RGB channels are permuted (one of the five
    # non-identity orders, uniformly). A reconstruction target stays valid under any
    # permutation, and it shows the VAE every hue: trained without it, a VAE has no
    # code for the hues its corpus shows little of (the shipped one returns every
    # green square gray). bench/decoders.py on one H200, 16 clips, 3000 steps from
    # scratch: palette retention 61% -> 97% and PSNR 28.7 -> 30.9 dB with p = 0.5
    # (BENCHMARKS.md, session 13). 0 = off.
    colour_permute: float = 0.5
    # Train the decoders only (video decoder, audio mel decoder, vocoder): both
    # encoders and the latent calibration stay as the init_from checkpoint has them,
    # so the latents are unchanged and the DiT trained on them keeps working with the
    # new decoders (how improved image-VAE decoders are shipped as drop-ins). Needs
    # ``init_from``: a fresh encoder would be frozen at random.
    decoders_only: bool = False
    # The vocoder trains beside the VAEs on every step of this stage when
    # vocoder_steps > 0 (a switch, as recipes have always used it: its step count is
    # the stage's ``steps``). Each step it re-synthesises vocoder_segments random
    # mono segments of vocoder_segment_s seconds (clamped to the clip; on the audio
    # latent grid), drawn with the step's seeded per-rank generator, so a resumed
    # run draws the same ones; 0 segments = every channel of every clip whole (the
    # old recipe). Why segments: bench/decoders.py, 2-vCPU, synthetic clips' MR-STFT:
    # 4 x 1 s a step beat Griffin-Lim (1.02 vs 1.10 at 4000 steps), whole waveforms
    # with an early full-weight GAN did not (1.28).
    vocoder_segments: int = 4
    vocoder_segment_s: float = 1.0
    # Share of those segments drawn from clips with dialogue (quoted speech in the
    # conditioning text), when the corpus has any. The shipped corpus has dialogue in
    # 13 of 369 clips, and a vocoder trained on its batches alone did not learn speech:
    # word error rate 0.79 on held-out lines from their own mel, against Griffin-Lim's
    # 0.105 (one H200, 2000 steps); the same recipe on speech-rich audio reached 0.053
    # in 4000 steps (BENCHMARKS.md, session 17). 0 = the batch's clips only.
    vocoder_speech_share: float = 0.25
    # The audio VAE also reconstructs those clips with dialogue (the vocoder's draw, so
    # the windows and the VAEs' other data stay as they were). Off by default: on the
    # shipped corpus it left speech through the compact audio VAE as unintelligible as
    # before (word error rate 0.895 either way, one H200, 6000 steps); fresh VAEs on
    # speech-rich data show the latent rate is the limit (16 latents a second: 0.47-0.58
    # at any width; 32 a second: 0.0). BENCHMARKS.md, session 18.
    audio_vae_speech: bool = False
    # The GAN (multi-period / multi-resolution discriminators, feature matching) only
    # for the last vocoder_gan_fraction of the stage's steps, at vocoder_gan_weight,
    # ramped in over vocoder_gan_ramp_steps (a fresh discriminator's gradient is noise
    # at first). Mel + MR-STFT losses do the work; a full-weight GAN from 70% of the
    # steps made it worse, and a GAN step costs ~25 plain ones on CPU. A fraction
    # that rounds to no step (short runs) means no GAN and no discriminator.
    # vocoder_gan_start, when set (older configs: 50, or -1 = never), is the step the
    # GAN starts at instead of the fraction's.
    vocoder_gan_fraction: float = 0.05
    vocoder_gan_weight: float = 0.1
    vocoder_gan_start: int | None = None
    vocoder_gan_ramp_steps: int = 50
    # The video VAE's patch discriminator joins at video_gan_start (-1 = never; off
    # by default, so the tiny CPU recipes train as before), weighted by VQGAN's
    # adaptive weight times video_gan_weight.
    video_gan_start: int = -1
    video_gan_weight: float = 0.1
    disc_lr: float = 2e-4
    # Held-out clips for PSNR and mel distance.
    eval_clips: int = 4

    def validate(self) -> None:
        """Vocoder settings that would silently train something else (core.config
        calls this when a config is loaded)."""
        if self.vocoder_segments < 0 or self.vocoder_segment_s <= 0:
            raise ValueError(
                f"vocoder_segments must be >= 0 (0 = whole clips) and vocoder_segment_s > 0, "
                f"got {self.vocoder_segments} and {self.vocoder_segment_s}"
            )
        if not 0.0 <= self.vocoder_speech_share <= 1.0:
            raise ValueError(
                f"vocoder_speech_share is a share in [0, 1], got {self.vocoder_speech_share}"
            )
        if not 0.0 <= self.colour_permute <= 1.0:
            raise ValueError(
                f"colour_permute is a probability in [0, 1], got {self.colour_permute}"
            )
        if not 0.0 <= self.vocoder_gan_fraction <= 1.0 or self.vocoder_gan_weight < 0:
            raise ValueError(
                f"vocoder_gan_fraction must be in [0, 1] and vocoder_gan_weight >= 0, got "
                f"{self.vocoder_gan_fraction} and {self.vocoder_gan_weight}"
            )


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
    # A flow time per branch (see pipelines.train.loop.branch_times): the fraction of
    # samples whose audio time is drawn independently of the video's (else both
    # share one), and the fraction (among clips with sound) where one branch, video
    # or audio at even odds, is clean (t = 0) with its loss masked: that teaches
    # video-to-audio and audio-to-video as conditioning.
    independent_time_probability: float = 0.3
    clean_branch_probability: float = 0.2
    # Video loss weight of latent positions that stand out of their frame's median
    # latent (objects on a backdrop), as the VAE's standout term does for pixels:
    # a reference or a colour word that describes a small object changes a few
    # percent of the positions, so an unweighted mean gives reading it little
    # gradient. 0 = the plain mean (10 did not change reference usage in CPU runs:
    # BENCHMARKS.md, session 12).
    standout_weight: float = 0.0


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


def with_absolute_uris(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every local path made absolute in this process (the driver).

    Ray Train workers run in a directory of their own, where a relative run or data
    path names nothing (``core.storage.absolute_uri``); remote URIs are unchanged.
    """
    absolute = storage.absolute_uri
    data = replace(
        cfg.data,
        curated_uri=absolute(cfg.data.curated_uri),
        latent_cache_uri=absolute(cfg.data.latent_cache_uri),
    )
    return replace(cfg, run_uri=absolute(cfg.run_uri), init_from=absolute(cfg.init_from), data=data)


def stage_data(cfg: TrainConfig, stage: str) -> DataConfig:
    """The data settings a stage trains on: its own frame buckets where it sets them."""
    buckets = getattr(cfg.stage(stage), "frame_buckets", ())
    return replace(cfg.data, frame_buckets=tuple(buckets)) if buckets else cfg.data
