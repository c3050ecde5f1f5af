"""What a training stage is, apart from the loop that runs it: its task (the
networks, data and loss a stage builder hands :func:`pipelines.train.loop.run_stage`),
where its checkpoints live, and the latent cache its clips are encoded into once.

Stage builders (the DiT and VAE stages in :mod:`pipelines.train.loop`, the alignment
stages in :mod:`pipelines.align.stages`) import from here, so the loop can import
them without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from core import storage
from model.pipeline import DuetPipeline
from pipelines.train import state as ckpt
from pipelines.train.config import DataConfig, StageConfig, TrainConfig
from pipelines.train.data import ClipRow, SamplerPosition
from pipelines.train.latents import cache_key, encode_cache
from pipelines.train.runtime import Runtime


def stage_uri(cfg: TrainConfig, stage: str) -> str:
    return storage.join(cfg.run_uri, stage)


def final_uri(cfg: TrainConfig, stage: str) -> str:
    return storage.join(stage_uri(cfg, stage), ckpt.FINAL_NAME)


def stage_done(cfg: TrainConfig, stage: str) -> bool:
    return storage.exists(storage.join(final_uri(cfg, stage), "config.json"))


@dataclass
class StageTask:
    name: str
    module: nn.Module  # what the optimizer trains (possibly wrapped)
    components: tuple[str, ...]  # pipeline components the module's state covers
    settings: StageConfig
    rows: list[ClipRow]
    batch_fn: Callable[[list[int], torch.Generator, int], tuple[torch.Tensor, dict, int]]
    param_groups: list[dict] = field(default_factory=list)
    finish: Callable[[], dict] | None = None
    # Called once before the first step with the (possibly restored) data position
    # and the number of steps left in the stage.
    start: Callable[[SamplerPosition, int], None] | None = None
    # Written into the final checkpoint's metadata (e.g. the Fast student's ``fast``).
    final_extra: dict = field(default_factory=dict)
    # Names of param_groups whose gradients are clipped each on its own (networks
    # with losses of their own: one shared clip lets the largest gradient, the
    # vocoder's, scale every other network's step down); empty = one clip for all.
    clip_groups: tuple[str, ...] = ()
    # Called with the step after its backward, before clipping; what it returns joins
    # the step's metrics (DanceGRPO's gradient-noise monitor reads the gradient).
    after_backward: Callable[[int], dict] | None = None


def latent_cache_uri(
    cfg: TrainConfig, pipeline: DuetPipeline, data: DataConfig | None = None
) -> str:
    """Where the latents of this pipeline's VAE live (the key hashes its weights)."""
    data = data or cfg.data
    base = data.latent_cache_uri or storage.join(cfg.run_uri, "latents")
    return storage.join(base, cache_key(pipeline, data.frame_buckets))


def ensure_latents(
    cfg: TrainConfig,
    pipeline: DuetPipeline,
    rows: list[ClipRow],
    rt: Runtime,
    data: DataConfig | None = None,
) -> str:
    """Encode every clip once into the cache keyed by the VAE weights; returns its URI.

    Under the Ray runner the driver has already filled it with a Ray Data job
    (:mod:`pipelines.train.encode_job`); then this only finds the index.
    """
    uri = latent_cache_uri(cfg, pipeline, data)
    pipeline.eval()
    return encode_cache(
        pipeline, rows, uri, cfg.data.latent_shard_clips, rt.rank, rt.world_size, rt.barrier
    )
