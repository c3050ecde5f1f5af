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
        help="Checkpoint directory URI; default: $DUET_CHECKPOINT, else the shipped "
        "checkpoints/default/.",
    ),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Untrained weights of --preset instead of a checkpoint (noise: smoke tests).",
    ),
    preset: str = typer.Option("tiny", "--preset", help="Preset for --random-weights."),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(
        20, "--steps", help="Sampling steps (with --fast: 4 or 8; above 8 means the default 4)."
    ),
    fast: bool = typer.Option(
        False,
        "--fast",
        help="Fast variant: the distilled student (a `duet train distill` checkpoint), "
        "4 Euler steps, guidance distilled in.",
    ),
    sampler: str = typer.Option("heun", "--sampler", help="euler | heun"),
    duration: float = typer.Option(
        2.0, "--duration", help="Seconds (ignored with --shots, editing, --v2a or --a2v)."
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
    v2a: str = typer.Option(
        None,
        "--v2a",
        help="Video-to-audio: sound for this video (URI); its picture is kept unchanged.",
    ),
    a2v: str = typer.Option(
        None,
        "--a2v",
        help="Audio-to-video: a picture for this soundtrack (URI); the audio is kept unchanged.",
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
    from cli.common import absolute, absolute_all
    from core import storage
    from core.media import MediaError, read_audio, read_clip, read_video, write_mp4
    from model.checkpoint import CheckpointError
    from model.generate import (
        EditSpec,
        GenerationRequest,
        GivenMedia,
        ReferenceSet,
        resolve_pipeline,
    )
    from model.generate import generate as run_generate

    out, checkpoint, edit_source = absolute(out), absolute(checkpoint), absolute(edit_source)
    v2a, a2v = absolute(v2a), absolute(a2v)
    if sum(x is not None for x in (edit_source, v2a, a2v)) > 1:
        typer.echo("error: --edit-source, --v2a and --a2v exclude each other", err=True)
        raise typer.Exit(code=2)
    image_ref, video_ref, audio_ref = map(absolute_all, (image_ref, video_ref, audio_ref))
    checkpoint = _choose_checkpoint(checkpoint, random_weights, preset)
    if checkpoint:
        check_checkpoint(checkpoint, prompt)
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
        given = None
        if v2a:
            frames, fps = read_video(v2a, size=(cfg.width, cfg.height))
            given = GivenMedia("v2a", frames=frames, fps=fps)
        elif a2v:
            audio, rate = read_audio(a2v, sample_rate=cfg.sample_rate, channels=2)
            given = GivenMedia("a2v", audio=audio, sample_rate=rate)
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
            given=given,
            quality="fast" if fast else "full",
        )
        result = run_generate(request, pipeline=pipeline)
    except (
        ValueError,
        MediaError,
        CheckpointError,
        storage.StorageError,
        FileNotFoundError,
    ) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err

    write_mp4(out, result.clip)
    sidecar = (
        str(Path(out).with_suffix(".json")) if "://" not in out else out.rsplit(".", 1)[0] + ".json"
    )
    # "kind" tells `duet probe` this is no ground truth (core.probes.probe.sidecar_kind).
    metadata = {"kind": "generation", **result.metadata, "checkpoint": checkpoint, "video": out}
    storage.write_json(sidecar, metadata)
    clip = result.clip
    typer.echo(
        f"wrote {out}: {clip.num_frames / clip.fps:.2f} s ({clip.num_frames} frames @ "
        f"{clip.fps:g} fps), {clip.audio.shape[0]} ch audio @ {clip.sample_rate} Hz; "
        f"generated in {result.metadata['elapsed_s']:.1f} s "
        f"({result.metadata['quality']}: {result.metadata['steps']} steps, "
        f"{result.metadata['network_evals']:g} network evaluations)"
    )


def _choose_checkpoint(checkpoint: str | None, random_weights: bool, preset: str) -> str | None:
    """The checkpoint URI to load, or None for --random-weights; refuse (exit 2) when
    there is neither a checkpoint nor --random-weights, rather than write noise."""
    from model.checkpoint import DEFAULT_CHECKPOINT_DIR, DEFAULT_CHECKPOINT_ENV, default_checkpoint

    if checkpoint and random_weights:
        typer.echo("error: --checkpoint and --random-weights exclude each other", err=True)
        raise typer.Exit(code=2)
    if random_weights:
        typer.echo(f"note: untrained {preset} weights: the clip will be noise", err=True)
        return None
    found = checkpoint or default_checkpoint()
    if not found:
        typer.echo(
            "error: no checkpoint to generate from. Pass --checkpoint URI, set "
            f"{DEFAULT_CHECKPOINT_ENV}, or put a trained checkpoint in "
            f"{DEFAULT_CHECKPOINT_DIR}. "
            "--random-weights generates noise from untrained weights.",
            err=True,
        )
        raise typer.Exit(code=2)
    return found


def check_checkpoint(uri: str, prompt: str) -> None:
    """Refuse what is not a generating checkpoint (exit 2, one line), before any
    weights load; warn about prompt words the checkpoint's captions never used."""
    from cli.common import fail, warn
    from core import storage
    from model.checkpoint import CONFIG_NAME, read_meta
    from pipelines.align.reward import META_NAME as REWARD_META_NAME
    from pipelines.train.vocabulary import checkpoint_vocabulary, unknown_words

    if not storage.exists(uri):
        fail(f"{uri}: no such checkpoint folder")
    if storage.exists(storage.join(uri, REWARD_META_NAME)):
        fail(
            f"{uri} is a reward model (the rlhf stage's judge of clips), not a generating "
            "checkpoint: pass a pretrain, sft, rlhf or distill checkpoint (the run's sft/final)"
        )
    if not storage.exists(storage.join(uri, CONFIG_NAME)):
        # A run folder or a stage folder: name the finished checkpoints inside it.
        found = []
        for pattern in ("final", "*/final", "*/*/final"):
            found += storage.glob(storage.join(uri, pattern, CONFIG_NAME))
        below = [f[: -len(CONFIG_NAME) - 1] for f in found]
        hint = (
            f"checkpoints inside it: {', '.join(below[:4])}"
            if below
            else "pass the folder of a trained checkpoint (a training run's RUN/sft/final)"
        )
        fail(f"{uri} is not a checkpoint (no {CONFIG_NAME}): {hint}")
    meta = read_meta(uri)
    if (meta.get("extra") or {}).get("stage") == "vae":
        fail(
            f"{uri} is a vae-stage checkpoint: only its VAEs are trained, so its DiT would "
            "generate noise; pass a pretrain, sft, rlhf or distill checkpoint "
            "(the run's sft/final)"
        )
    vocabulary = checkpoint_vocabulary(meta)
    if not vocabulary or not prompt:
        return
    unknown = unknown_words(prompt, vocabulary)
    if unknown:
        named = ", ".join(
            f"{word!r} (nearest known: {', '.join(near)})" if near else f"{word!r}"
            for word, near in unknown.items()
        )
        warn(
            f"this checkpoint's training captions never use {named}; it knows "
            f"{len(vocabulary)} words and may ignore the others"
        )
