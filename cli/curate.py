"""``duet curate``."""

from __future__ import annotations

import typer


def curate() -> None:
    """Not built yet."""
    raise typer.Exit(code=2)
