"""``duet probe``: measure a video on the synthetic world's terms."""

from __future__ import annotations

import typer


def probe(
    video_uri: str = typer.Argument(..., help="Video file URI (local, file://, s3://)."),
    json_out: str = typer.Option(
        "", "--json-out", help="Write the full probe JSON (with per-frame detections) here."
    ),
    frames: bool = typer.Option(
        False, "--frames/--no-frames", help="Include per-frame detections in the printed JSON."
    ),
) -> None:
    """Print the probe JSON of a video on stdout; with a ground-truth sidecar beside
    it, a table of its errors goes to stderr (stdout stays parseable JSON)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from core import storage
    from core.media import MediaError
    from core.probes import compare_to_truth, probe_video

    console = Console(stderr=True)
    try:
        result = probe_video(video_uri, include_frames=True)
    except MediaError as err:
        console.print(f"[red]cannot probe {video_uri}: {err.reason}[/red]")
        raise typer.Exit(code=1) from err
    if json_out:
        storage.write_json(json_out, result)
    shown = result if frames else {k: v for k, v in result.items() if k != "frames"}
    print(json.dumps(shown, indent=1))

    sidecar_uri = video_uri.rsplit(".", 1)[0] + ".json"
    if storage.exists(sidecar_uri) and sidecar_uri != json_out:
        errors = compare_to_truth(result, storage.read_json(sidecar_uri))
        table = Table(title=f"errors against ground truth ({sidecar_uri})")
        table.add_column("metric")
        table.add_column("value")
        for key, value in errors.items():
            if isinstance(value, dict):
                parts = [f"{k}={v}" for k, v in value.items()]
                table.add_row(key, ", ".join(parts))
            else:
                table.add_row(key, str(value))
        console.print(table)
