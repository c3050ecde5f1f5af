"""``duet train STAGE --config FILE``: run training stages on a curated dataset."""

from __future__ import annotations

import typer

STAGE_CHOICES = ("vae", "pretrain", "sft", "rlhf", "distill", "all")


def train(
    stage: str = typer.Argument(
        ...,
        help="vae | pretrain | sft | rlhf | distill | all "
        "(vae -> pretrain -> sft -> rlhf -> distill).",
    ),
    config_uri: str | None = typer.Option(
        None, "--config", help="TrainConfig as TOML/JSON at any URI (defaults otherwise)."
    ),
    data: str | None = typer.Option(
        None, "--data", help="Curated dataset URI (overrides data.curated_uri)."
    ),
    run: str | None = typer.Option(
        None, "--run", help="Run URI for checkpoints (overrides run_uri)."
    ),
    runner: str = typer.Option("ray", "--runner", help="ray (Ray Train) | local (this process)."),
    num_workers: int = typer.Option(1, "--num-workers", min=1, help="Ray Train workers."),
    gpu: bool = typer.Option(False, "--gpu/--cpu", help="One GPU per Ray Train worker."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Join this Ray cluster; a local Ray if unset."
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override each stage's steps."),
) -> None:
    """Train the model in stages: vae -> pretrain -> sft -> rlhf (DanceGRPO) -> distill (Fast);
    resumes from the last checkpoint."""
    import dataclasses

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipelines.train import train as run_training
    from pipelines.train.config import STAGES, TrainConfig, train_config_from

    console = Console(stderr=True)
    if stage not in STAGE_CHOICES:
        raise typer.BadParameter(f"stage must be one of {STAGE_CHOICES}, got {stage!r}")
    if runner not in ("ray", "local"):
        raise typer.BadParameter(f"--runner must be ray or local, got {runner!r}")
    cfg: TrainConfig = train_config_from(config_uri)
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, curated_uri=data))
    if run:
        cfg = dataclasses.replace(cfg, run_uri=run)
    stages = STAGES if stage == "all" else (stage,)
    if steps is not None:
        cfg = dataclasses.replace(
            cfg, **{s: dataclasses.replace(cfg.stage(s), steps=steps) for s in stages}
        )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, int] = {}

        def on_progress(name: str, step: int, total: int, row: dict) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total, loss="-")
            bar.update(tasks[name], completed=step, loss=f"{row.get('loss', float('nan')):.4f}")

        finals = run_training(
            cfg, stages, runner=runner, num_workers=num_workers, use_gpu=gpu,
            ray_address=ray_address, progress=on_progress,
        )  # fmt: skip
    for name, uri in finals.items():
        console.print(f"[green]{name}[/green] final checkpoint: {uri}")
