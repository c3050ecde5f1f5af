"""Prefect flow ``train``: vae -> pretrain -> sft -> rlhf -> distill, each stage a task,
finished ones skipped.

The flow only orders the stages; each stage runs on Ray Train (or in this process
with ``runner="local"``) through :func:`pipelines.train.train`. A stage whose final
checkpoint exists is skipped, so a rerun (or a retried flow run) continues where
the last one stopped; inside a stage, training resumes from its newest checkpoint.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.train import train as run_training
from pipelines.train.config import STAGES, TrainConfig, train_config_from, with_absolute_uris
from pipelines.train.loop import final_uri, stage_done
from pipelines.train.sequences import needs_sequences, sequences_from_footage


@task(name="train-stage", cache_policy=NO_CACHE, retries=1)
def stage_task(
    cfg: TrainConfig, stage: str, runner: str, num_workers: int, use_gpu: bool, ray_address
) -> str:
    logger = get_run_logger()
    if stage_done(cfg, stage):
        logger.info("stage %s already finished: %s", stage, final_uri(cfg, stage))
        return final_uri(cfg, stage)
    logger.info("stage %s: %d steps on %s x%d", stage, cfg.stage(stage).steps, runner, num_workers)
    return run_training(cfg, (stage,), runner, num_workers, use_gpu, ray_address)[stage]


@task(name="train-sequences", cache_policy=NO_CACHE)
def sequences_task(curated_uri: str) -> str | None:
    """Multi-shot sequences cut from curated footage that has shots and none yet."""
    if not needs_sequences(curated_uri):
        return None
    table = sequences_from_footage(curated_uri, curated_uri)
    get_run_logger().info("multi-shot sequences: %s", table)
    return table


@flow(name="train")
def train_flow(
    config: dict[str, Any] | None = None,
    config_uri: str | None = None,
    stages: list[str] | None = None,
    runner: str = "ray",
    num_workers: int = 1,
    use_gpu: bool = False,
    ray_address: str | None = None,
    sequences: bool = False,
) -> dict[str, str]:
    """Train ``stages`` (default: all) in order; returns each stage's final checkpoint.
    ``sequences``: first cut multi-shot sequences from the curated footage when it has
    a shots table and no sequences table (off by default: it reads every source)."""
    # Absolute before the tasks see it: a worker (Prefect's or Ray's) may run elsewhere.
    cfg = with_absolute_uris(train_config_from(config_uri if config_uri else config))
    if sequences:
        sequences_task(cfg.data.curated_uri)
    finals = {}
    for stage in stages or list(STAGES):
        finals[stage] = stage_task(cfg, stage, runner, num_workers, use_gpu, ray_address)
    return finals
