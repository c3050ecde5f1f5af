"""``duet model ...``: inspect model presets."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect model presets.", no_args_is_help=True, rich_markup_mode=None)


def _fmt(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@app.command("info")
def info(
    preset: str = typer.Argument(..., help="tiny | small | base | xl"),
    text_encoder: bool = typer.Option(
        True, help="Also count the frozen text encoder (loads it from its local directory)."
    ),
) -> None:
    """Print parameter counts per component of a preset."""
    from rich.console import Console
    from rich.table import Table

    from model.configs import PRESETS, get_config
    from model.pipeline import parameter_breakdown

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = get_config(preset)
    rows = parameter_breakdown(cfg)
    table = Table(
        title=f"duet model {preset}: {cfg.width}x{cfg.height} @ {cfg.fps:g} fps, {cfg.sample_rate} Hz"
    )
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("exact", justify="right")
    for name, n in rows:
        table.add_row(name, _fmt(n), f"{n:,}")
    trainable = sum(n for _, n in rows)
    dit = sum(n for name, n in rows if name.startswith("dit."))
    table.add_section()
    table.add_row("dit (total)", _fmt(dit), f"{dit:,}")
    table.add_row("trainable (total)", _fmt(trainable), f"{trainable:,}")
    if text_encoder:
        try:
            from model.text_encoder import FrozenTextEncoder

            enc = FrozenTextEncoder(cfg.text.model_path, cfg.text.max_tokens)
            frozen = sum(p.numel() for p in enc.model.parameters())
            table.add_row("text encoder (frozen)", _fmt(frozen), f"{frozen:,}")
        except (ImportError, OSError) as err:
            table.add_row("text encoder (frozen)", "n/a", str(err)[:40])
    Console().print(table)
    print(
        f"latent grid: video {cfg.video_vae.spatial_factor}x spatial / {cfg.video_vae.temporal_factor}x "
        f"temporal ({cfg.video_latent_rate:g} latent frames/s), audio {cfg.audio_latent_rate:g} latents/s "
        f"({cfg.audio_latents_per_video_latent} per video latent, mel hop {cfg.mel_hop_length})"
    )
