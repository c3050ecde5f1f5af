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
    """Print the probe JSON of a video on stdout. A JSON file beside it is named on
    stderr by kind: ground truth (a table of the probe's errors against it) or a
    generated clip's metadata (its prompt's adherence); stdout stays parseable JSON."""
    import json

    from rich.console import Console

    from cli.common import FAILED, absolute, fail
    from core import storage
    from core.media import MediaError
    from core.probes import probe_video

    console = Console(stderr=True)
    video_uri, json_out = absolute(video_uri), absolute(json_out)
    try:
        result = probe_video(video_uri, include_frames=True)
    except MediaError as err:
        # One line, whatever the terminal's width: the reason quotes the whole path.
        fail(f"cannot probe {video_uri}: {err.reason}", FAILED)
    if json_out:
        storage.write_json(json_out, result)
    shown = result if frames else {k: v for k, v in result.items() if k != "frames"}
    print(json.dumps(shown, indent=1))

    sidecar_uri = video_uri.rsplit(".", 1)[0] + ".json"
    if storage.exists(sidecar_uri) and sidecar_uri != json_out:
        _report_sidecar(console, result, sidecar_uri)


def _report_sidecar(console, result: dict, sidecar_uri: str) -> None:
    """Say which kind of file sits beside the video, and compare the probe with it
    only when it is ground truth (stderr: stdout stays the probe JSON)."""
    import json

    from rich.table import Table

    from core import storage
    from core.probes.captions import caption_adherence
    from core.probes.probe import SIDECAR_GENERATION, SIDECAR_TRUTH, compare_to_truth, sidecar_kind

    try:
        sidecar = storage.read_json(sidecar_uri)
    except (UnicodeDecodeError, json.JSONDecodeError):
        sidecar = None
    kind = sidecar_kind(sidecar)
    if kind == SIDECAR_TRUTH:
        console.print(
            f"{sidecar_uri}: ground truth of the synthetic world", highlight=False, soft_wrap=True
        )
        errors = compare_to_truth(result, sidecar)
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
    elif kind == SIDECAR_GENERATION:
        prompt = sidecar.get("prompt") or ""
        console.print(
            f"{sidecar_uri}: generation metadata, not ground truth (prompt {prompt!r}); "
            "measured against the prompt only",
            highlight=False,
            soft_wrap=True,
        )
        table = Table(title=f"generated clip against its request ({sidecar_uri})")
        table.add_column("metric")
        table.add_column("value")
        table.add_row("prompt", prompt)
        try:
            adherence = f"{caption_adherence(prompt, result['frames']):.3f}"
        except ValueError:
            adherence = "n/a (the prompt names no coloured shape the probes know)"
        table.add_row("caption adherence", adherence)
        table.add_row("av_offset_ms", str(result["av_offset_ms"]))
        for key in ("checkpoint", "seed", "steps", "quality"):
            if key in sidecar:
                table.add_row(key, str(sidecar[key]))
        console.print(table)
    else:
        console.print(
            f"{sidecar_uri}: neither ground truth nor generation metadata; not used",
            highlight=False,
            soft_wrap=True,
        )
