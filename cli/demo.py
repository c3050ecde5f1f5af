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
) -> None:
    """Synthesise raw footage, probe it against ground truth, curate it into a manifest."""
    from cli.demo_run import run_demo

    run_demo(str(out), num_videos=num_videos, seed=seed, speech=speech)
