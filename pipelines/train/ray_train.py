"""Run a stage under Ray Train: ``TorchTrainer`` around :func:`pipelines.train.loop.run_stage`.

Ray Train starts ``num_workers`` processes with a torch process group (gloo on CPU,
NCCL on GPU), restarts the group after a worker dies (``FailureConfig``), keeps the
newest K checkpoints (``CheckpointConfig``) under ``RUN/<stage>/`` through our own
fsspec filesystem (local or S3), and hands the newest one back to the restarted
workers through ``ray.train.get_checkpoint()``. A driver that was killed and run
again finds the same checkpoints in storage and resumes from the newest.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from core import storage
from core.config import config_to_dict
from pipelines.train.config import TrainConfig, train_config_from, with_absolute_uris

# Ray Train's controller acts on what its workers did at its polls, every 2 s by default:
# the start of a stage's training and the end of a finished stage each wait for one,
# idle seconds that add up over a chain of short stages (`duet demo --quick`, three
# stages: 78-79 s at 2 s, 68-74 s at 0.5 s; BENCHMARKS.md). A poll is one small call
# per worker. The driver's value reaches the controller on a joined cluster too.
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.5"


def _worker_entry(config: dict[str, Any]) -> None:
    from pipelines.train.loop import run_stage
    from pipelines.train.runtime import ray_runtime

    cfg = train_config_from(config["train_config"])
    run_stage(cfg, config["stage"], ray_runtime())


def ensure_ray(ray_address: str | None, num_cpus: int | None = None) -> bool:
    """Join ``ray_address`` or start a local Ray (shared set-up: :mod:`core.ray_setup`)."""
    from core.ray_setup import init_ray

    return init_ray(ray_address, num_cpus)


def _storage(run_uri: str) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem) for a run URI, through fsspec."""
    import pyarrow.fs

    if storage.scheme_of(run_uri) in ("", "file"):
        return os.path.abspath(storage.strip_scheme(run_uri)), None
    fs = storage.filesystem(run_uri)
    return storage.strip_scheme(run_uri), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _worker_resources(cfg: TrainConfig, stage: str, use_gpu: bool) -> dict[str, float]:
    """One CPU per worker, less the share its decode tasks take when the VAE stage streams.

    The decode tasks are scheduled after the workers hold their resources; if the
    workers took whole CPUs on a small cluster (2 workers on 2 CPUs) the tasks would
    wait forever, so each worker gives up ``data.decode_cpus`` for its own stream.
    """
    cpus = 1.0
    if stage == "vae" and cfg.data.stream_with_ray_data:
        cpus = max(0.1, 1.0 - cfg.data.decode_cpus)
    return {"CPU": cpus, "GPU": 1.0} if use_gpu else {"CPU": cpus}


def run_stage_on_ray(
    cfg: TrainConfig,
    stage: str,
    num_workers: int,
    use_gpu: bool = False,
    ray_address: str | None = None,
    progress: Callable[[str, int, int, dict], None] | None = None,
) -> Any:
    """Train one stage with ``num_workers`` Ray Train workers; returns Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # The workers' working directory is Ray's, not the caller's.
    cfg = with_absolute_uris(cfg)
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S)
    ensure_ray(ray_address)
    storage_path, filesystem = _storage(cfg.run_uri)
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"train_config": config_to_dict(cfg), "stage": stage},
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=_worker_resources(cfg, stage, use_gpu),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=stage,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    stop = threading.Event()
    watcher = None
    if progress is not None:
        watcher = threading.Thread(target=_watch, args=(cfg, stage, progress, stop), daemon=True)
        watcher.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=5)
    # A checkpoint uploaded just before a worker died may never reach Ray's
    # checkpoint manager (the failed group's pending reports are dropped), so
    # Ray never prunes it; the restarted workers may still have resumed from it
    # (our own storage listing). Keep-last-K is applied once more here, by step.
    from pipelines.train.state import prune_checkpoints

    prune_checkpoints(storage.join(cfg.run_uri, stage), cfg.keep_checkpoints)
    return result


def _watch(cfg: TrainConfig, stage: str, progress, stop: threading.Event) -> None:
    """Feed the driver's progress bar from the metrics the workers flush to storage."""
    import json

    from pipelines.train.logs import METRICS_NAME

    uri = storage.join(cfg.run_uri, stage, METRICS_NAME)
    total = cfg.stage(stage).steps
    while True:
        # One more read once the stage has ended: a stage shorter than the poll would
        # otherwise show no step at all, and a longer one not its last.
        ended = stop.wait(2.0)
        try:
            lines = storage.read_text(uri).splitlines()
        except (OSError, storage.StorageError):
            lines = []
        if lines:
            row = json.loads(lines[-1])
            progress(stage, int(row["step"]), total, row)
        if ended:
            return
