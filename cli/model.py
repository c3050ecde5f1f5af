"""``duet model ...``."""

from __future__ import annotations

import typer

app = typer.Typer(help="Inspect model presets.", no_args_is_help=True)
