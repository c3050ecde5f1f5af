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
    sequences: bool = typer.Option(
        False,
        "--sequences/--no-sequences",
        help="First cut multi-shot sequences from the curated footage (as `duet sequences` "
        "does) when it has a shots table and no sequences table yet.",
    ),
) -> None:
    """Train the model in stages: vae -> pretrain -> sft -> rlhf (DanceGRPO) -> distill (Fast);
    resumes from the last checkpoint."""
    import dataclasses

    from rich.console import Console

    from cli.common import absolute
    from cli.progress import TrainProgress
    from pipelines.train import train as run_training
    from pipelines.train.config import STAGES, TrainConfig, train_config_from, with_absolute_uris

    console = Console(stderr=True)
    if stage not in STAGE_CHOICES:
        raise typer.BadParameter(f"stage must be one of {STAGE_CHOICES}, got {stage!r}")
    if runner not in ("ray", "local"):
        raise typer.BadParameter(f"--runner must be ray or local, got {runner!r}")
    # The Ray Train workers run in a directory of their own: every path is made
    # absolute here, the config's too (relative to where duet was started).
    config_uri, data, run = absolute(config_uri), absolute(data), absolute(run)
    cfg: TrainConfig = with_absolute_uris(train_config_from(config_uri))
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, curated_uri=data))
    if run:
        cfg = dataclasses.replace(cfg, run_uri=run)
    stages = STAGES if stage == "all" else (stage,)
    if steps is not None:
        cfg = dataclasses.replace(
            cfg, **{s: dataclasses.replace(cfg.stage(s), steps=steps) for s in stages}
        )

    _check_dataset(cfg, stages)
    if sequences:
        _sequences_first(console, cfg.data.curated_uri)
    with TrainProgress(console) as progress:
        finals = run_training(
            cfg, stages, runner=runner, num_workers=num_workers, use_gpu=gpu,
            ray_address=ray_address, progress=progress,
        )  # fmt: skip
    for name, uri in finals.items():
        console.print(f"[green]{name}[/green] final checkpoint: {uri}")


def _check_dataset(cfg, stages: tuple[str, ...]) -> None:
    """Refuse, in one line and before Ray starts, a dataset the stages cannot train on:
    none named, no manifest there, or a manifest of another schema version."""
    import pyarrow.parquet as pq

    from cli.common import fail
    from core import storage
    from curation.manifest import SCHEMA_VERSION
    from pipelines.train.data import clips_table_uri
    from pipelines.train.loop import stage_done

    if all(stage_done(cfg, s) for s in stages):
        return  # nothing to train: finished stages are skipped without their data
    curated = cfg.data.curated_uri
    if not curated:
        fail("no curated dataset: pass --data DIR (the --out of `duet curate`) or set "
             "data.curated_uri in --config")  # fmt: skip
    table = clips_table_uri(curated)
    if not storage.exists(table):
        fail(f"no manifest at {table}: is {curated} the --out folder of `duet curate`? "
             "Curate the footage first")  # fmt: skip
    with storage.local_copy(table) as path:
        metadata = pq.read_schema(path).metadata or {}
    # Hand-built manifests (the conditioning corpus, a carried one) record no version
    # and are read as training always read them; a recorded other version is refused.
    version = metadata.get(b"duet.schema_version")
    if version is not None and version != str(SCHEMA_VERSION).encode():
        todo = "curate the footage again with this version"
        if version.decode().isdigit() and int(version) > SCHEMA_VERSION:
            # A newer Duet reads it as it is; curating again would redo all its work.
            todo = ("it was written by a newer Duet: update this one (`git pull`, then "
                    f"`make venv`) or {todo}")  # fmt: skip
        fail(f"{table} has manifest schema_version {version.decode()}, this Duet reads "
             f"{SCHEMA_VERSION}: {todo}")  # fmt: skip


def _sequences_first(console, curated: str) -> None:
    """``--sequences``: multi-shot sequences for a curated folder that has shots and
    no sequences yet (training reads the table; without it multi-shot steps are skipped)."""
    from cli.sequences import cut_sequences
    from pipelines.train.sequences import needs_sequences, table_uri

    if needs_sequences(curated):
        table, rows = cut_sequences(curated, curated)
        console.print(f"sequences: {len(rows)} in {table}", highlight=False, soft_wrap=True)
    else:
        console.print(
            f"sequences: none cut ({table_uri(curated)} is there, or {curated} has no shots table)",
            highlight=False,
            soft_wrap=True,
        )
