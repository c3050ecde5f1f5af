"""The training pipeline: ``vae -> pretrain -> sft (-> rlhf -> distill)`` on a curated dataset.

- :mod:`.config`: dataclass configs (loaded by :mod:`core.config`);
- :mod:`.data`: manifest rows, frame buckets, the resumable epoch sampler;
- :mod:`.latents`: the pre-encoded latent cache, keyed by the VAE weights;
- :mod:`.batches`: DiT batches with references and multi-shot sequences from data;
- :mod:`.task`: what a stage hands the loop (:class:`~.task.StageTask`), its URIs and latents;
- :mod:`.loop`: one stage, Ray-free (one process, torchrun, or a Ray Train worker);
- :mod:`.state`: checkpoints (weights, EMA, optimizer, data position) at any URI;
- :mod:`.ray_train`: the same loop under Ray Train's ``TorchTrainer``;
- :mod:`.logs`: TensorBoard events, metrics.jsonl and an HTML report per stage;
- ``rlhf`` and ``distill`` are tasks of the same loop, in :mod:`pipelines.align`.

:func:`train` runs a list of stages in order, skipping those already finished.
"""

from __future__ import annotations

from collections.abc import Callable

from pipelines.train.config import BASE_STAGES, STAGES, TrainConfig


def train(
    cfg: TrainConfig,
    stages: tuple[str, ...] = BASE_STAGES,
    runner: str = "local",
    num_workers: int = 1,
    use_gpu: bool = False,
    ray_address: str | None = None,
    progress: Callable[[str, int, int, dict], None] | None = None,
) -> dict[str, str]:
    """Run ``stages`` in order; returns each stage's final checkpoint URI.

    ``runner``: ``"local"`` (this process, or a torchrun group) or ``"ray"``
    (Ray Train with ``num_workers`` workers). A stage whose final checkpoint exists
    is skipped, so rerunning the same command resumes where it stopped. Local paths
    in ``cfg`` are made absolute here, before any worker sees them.
    """
    from pipelines.train.config import with_absolute_uris
    from pipelines.train.loop import final_uri, run_stage, stage_done

    cfg = with_absolute_uris(cfg)

    if runner not in ("local", "ray"):
        raise ValueError(f"runner must be 'local' or 'ray', got {runner!r}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
    finals = {}
    for stage in stages:
        if not stage_done(cfg, stage):
            if progress is not None:  # shown while Ray starts and latents are encoded
                progress(stage, 0, cfg.stage(stage).steps, {})
            if runner == "ray":
                from pipelines.train.ray_train import run_stage_on_ray

                if stage in ("pretrain", "sft") and cfg.data.encode_with_ray_data:
                    _encode_latents_on_ray(cfg, stage, ray_address)
                run_stage_on_ray(cfg, stage, num_workers, use_gpu, ray_address, progress)
            else:
                from pipelines.train.runtime import local_runtime

                run_stage(cfg, stage, local_runtime(), progress)
        finals[stage] = final_uri(cfg, stage)
    return finals


def _encode_latents_on_ray(cfg: TrainConfig, stage: str, ray_address: str | None) -> str:
    """Fill the stage's latent cache with the Ray Data pre-encode job (driver side)."""
    from model.pipeline import DuetPipeline
    from pipelines.train.config import stage_data
    from pipelines.train.encode_job import encode_on_ray_data
    from pipelines.train.loop import latent_cache_uri, parent_checkpoint
    from pipelines.train.ray_train import ensure_ray

    parent = parent_checkpoint(cfg, stage)
    ensure_ray(ray_address)
    data = stage_data(cfg, stage)
    uri = latent_cache_uri(cfg, DuetPipeline.from_checkpoint(parent), data)
    return encode_on_ray_data(parent, data, uri)
