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
) -> None:
    """Generate a raw synthetic corpus and print a probe summary against ground truth."""
    from cli.demo_run import run_demo

    run_demo(str(out), num_videos=num_videos, seed=seed)
