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
from pipelines.train.config import STAGES, TrainConfig, train_config_from
from pipelines.train.loop import final_uri, stage_done


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


@flow(name="train")
def train_flow(
    config: dict[str, Any] | None = None,
    config_uri: str | None = None,
    stages: list[str] | None = None,
    runner: str = "ray",
    num_workers: int = 1,
    use_gpu: bool = False,
    ray_address: str | None = None,
) -> dict[str, str]:
    """Train ``stages`` (default: all) in order; returns each stage's final checkpoint."""
    cfg = train_config_from(config_uri if config_uri else config)
    finals = {}
    for stage in stages or list(STAGES):
        finals[stage] = stage_task(cfg, stage, runner, num_workers, use_gpu, ray_address)
    return finals
