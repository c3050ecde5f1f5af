"""``duet synth``: write a seeded corpus of raw synthetic footage with ground truth."""

from __future__ import annotations

import typer


def synth(
    out_uri: str = typer.Argument(..., help="Folder or URI (local, file://, s3://) to write to."),
    num_videos: int = typer.Option(20, "--num-videos", "-n", min=1, help="Videos to generate."),
    seed: int = typer.Option(0, help="Seed of the corpus; the same seed gives the same corpus."),
    width: int = typer.Option(320, help="Frame width in pixels (even)."),
    height: int = typer.Option(192, help="Frame height in pixels (even)."),
    fps: float = typer.Option(24.0, help="Frames per second."),
    sample_rate: int = typer.Option(48000, help="Audio sample rate in Hz."),
    min_shots: int = typer.Option(3, help="Fewest shots per video."),
    max_shots: int = typer.Option(8, help="Most shots per video."),
    min_shot_s: float = typer.Option(2.5, help="Shortest shot in seconds."),
    max_shot_s: float = typer.Option(5.0, help="Longest shot in seconds."),
    fade_probability: float = typer.Option(0.4, help="Chance that a transition is a fade."),
    kinds: str = typer.Option(
        "", help="Comma-separated scene kinds to draw from (default: all kinds)."
    ),
    crf: int = typer.Option(18, help="H.264 quality (lower is better)."),
) -> None:
    """Generate raw synthetic videos (MP4 + JSON sidecar of ground truth)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from cli.common import absolute
    from core.synth import SCENE_KINDS, SynthConfig, generate_corpus

    out_uri = absolute(out_uri)
    console = Console()
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip()) or SCENE_KINDS
    config = SynthConfig(
        width=width,
        height=height,
        fps=fps,
        sample_rate=sample_rate,
        min_shots=min_shots,
        max_shots=max_shots,
        min_shot_s=min_shot_s,
        max_shot_s=max_shot_s,
        fade_probability=fade_probability,
        kinds=chosen,
        crf=crf,
    )
    try:
        config.validate()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    with Progress(
        TextColumn("[bold]synthesising"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
    ) as bar:
        task = bar.add_task("synth", total=num_videos, last="")
        uris = generate_corpus(
            out_uri,
            num_videos,
            seed=seed,
            config=config,
            progress=lambda i, uri: bar.update(task, advance=1, last=uri.rsplit("/", 1)[-1]),
        )
    console.print(f"wrote {len(uris)} videos with sidecars to {out_uri}")
