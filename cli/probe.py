"""``duet probe``."""

from __future__ import annotations

import typer


def probe() -> None:
    """Not built yet."""
    raise typer.Exit(code=2)
