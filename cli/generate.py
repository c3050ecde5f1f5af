"""``duet generate``: one clip with muxed audio, written as MP4 to any URI."""

from __future__ import annotations

from pathlib import Path

import typer


def _read_image(uri: str):
    import numpy as np
    from PIL import Image

    from core import storage

    with storage.local_copy(uri) as path:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _shot_plan(shots: str):
    from model.multishot import ShotPlan

    text = shots
    if not shots.lstrip().startswith(("[", "{")):
        from core import storage

        text = storage.read_text(shots)
    return ShotPlan.from_json(text)


def generate(
    prompt: str = typer.Option("", "--prompt", "-p", help="What to generate."),
    out: str = typer.Option(..., "--out", "-o", help="Output MP4 URI (local path or s3://)."),
    checkpoint: str = typer.Option(
        None,
        "--checkpoint",
        help="Checkpoint directory URI; random weights of --preset if omitted.",
    ),
    preset: str = typer.Option("tiny", "--preset", help="Preset used when no checkpoint is given."),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(20, "--steps"),
    sampler: str = typer.Option("heun", "--sampler", help="euler | heun"),
    duration: float = typer.Option(
        2.0, "--duration", help="Seconds (ignored with --shots or editing)."
    ),
    text_scale: float = typer.Option(4.0, "--text-scale"),
    ref_scale: float = typer.Option(1.5, "--ref-scale"),
    shots: str = typer.Option(
        None,
        "--shots",
        help='Shot plan: JSON text or a URI of a JSON file, e.g. [{"prompt": ..., "duration_s": 2}]',
    ),
    edit_source: str = typer.Option(None, "--edit-source", help="Video to edit (SDEdit)."),
    strength: float = typer.Option(0.6, "--strength", help="Edit strength in (0, 1]."),
    keep: str = typer.Option(
        "none", "--keep", help="Editing: none | audio | video (branch kept from the source)."
    ),
    image_ref: list[str] = typer.Option(
        None, "--image-ref", help="Image reference URI (repeat, up to 9)."
    ),
    video_ref: list[str] = typer.Option(
        None, "--video-ref", help="Video reference URI (repeat, up to 3)."
    ),
    audio_ref: list[str] = typer.Option(
        None, "--audio-ref", help="Audio reference URI (repeat, up to 3)."
    ),
) -> None:
    """Generate a clip with synchronized audio and write it as an MP4 (plus a JSON sidecar)."""
    from core import storage
    from core.media import MediaError, read_audio, read_clip, read_video, write_mp4
    from model.generate import EditSpec, GenerationRequest, ReferenceSet, resolve_pipeline
    from model.generate import generate as run_generate

    if not checkpoint:
        typer.echo(f"note: no --checkpoint, using untrained {preset} weights", err=True)
    try:
        pipeline = resolve_pipeline(None, checkpoint, preset)
        cfg = pipeline.config
        references = None
        if image_ref or video_ref or audio_ref:
            references = ReferenceSet(
                images=[_read_image(u) for u in image_ref or []],
                videos=[read_video(u, size=(cfg.width, cfg.height))[0] for u in video_ref or []],
                audios=[
                    read_audio(u, sample_rate=cfg.sample_rate, channels=2)[0]
                    for u in audio_ref or []
                ],
            )
        edit = None
        if edit_source:
            source = read_clip(
                edit_source, sample_rate=cfg.sample_rate, size=(cfg.width, cfg.height)
            )
            edit = EditSpec(source=source, strength=strength, keep=keep)
        request = GenerationRequest(
            prompt=prompt,
            duration_s=duration,
            seed=seed,
            steps=steps,
            sampler=sampler,
            text_scale=text_scale,
            ref_scale=ref_scale,
            references=references,
            shots=_shot_plan(shots) if shots else None,
            edit=edit,
        )
        result = run_generate(request, pipeline=pipeline)
    except (ValueError, MediaError, storage.StorageError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err

    write_mp4(out, result.clip)
    sidecar = (
        str(Path(out).with_suffix(".json")) if "://" not in out else out.rsplit(".", 1)[0] + ".json"
    )
    metadata = {**result.metadata, "checkpoint": checkpoint, "video": out}
    storage.write_json(sidecar, metadata)
    typer.echo(
        f"wrote {out}: {result.clip.num_frames} frames @ {result.clip.fps:g} fps, "
        f"{result.clip.audio.shape[0]} ch audio @ {result.clip.sample_rate} Hz, "
        f"{result.metadata['elapsed_s']} s"
    )
