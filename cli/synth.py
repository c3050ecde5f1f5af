"""``duet synth``."""

from __future__ import annotations

import typer


def synth() -> None:
    """Not built yet."""
    raise typer.Exit(code=2)
