"""``duet demo``: the main job end to end on the embedded default corpus."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(
        Path("demo_out"), help="Folder (or URI) for everything the demo writes."
    ),
    num_videos: int = typer.Option(20, help="Raw synthetic videos to generate."),
    seed: int = typer.Option(0, help="Seed of the synthetic world."),
    speech: bool = typer.Option(True, "--speech/--no-speech", help="WhisperX transcripts."),
    train_scale: float = typer.Option(
        1.0, "--train-scale", min=0.0, help="Multiply training steps (0 skips training)."
    ),
    train_workers: int = typer.Option(2, "--train-workers", min=1, help="Ray Train workers."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Smallest settings (CI): 3 short 128x128 videos, no speech, a few steps "
        "per stage, one clip generated; no shipped clip, no Serve app.",
    ),
) -> None:
    """Synthesise footage, probe it, curate it, train tiny on it, generate a clip from
    that and one from the shipped default checkpoint."""
    from cli.common import absolute
    from cli.demo_run import run_demo

    run_demo(
        absolute(str(out)), num_videos=num_videos, seed=seed, speech=speech,
        train_scale=train_scale, train_workers=train_workers, quick=quick,
    )  # fmt: skip
