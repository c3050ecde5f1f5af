"""``duet prefs ...``: human preference judgements for the reward model."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Human preference judgements (the serve app's /rank page writes the same rows).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.command("import")
def import_(
    file: str = typer.Argument(
        ...,
        help="CSV (header line) or Parquet of judgements: left, right, rater_id, "
        "choice_<head> (left|right|tie|skip, empty: not asked); optional prompt, "
        "source, tenant, created_at (ISO 8601), judgement_id.",
    ),
    table: str = typer.Option(
        ..., "--table", help="The candidate table (RUN/rlhf/preferences/preferences.parquet)."
    ),
    source: str = typer.Option(
        "human", "--source", help="human | rater (rows without a source column)."
    ),
    tenant: str = typer.Option("default", "--tenant", help="Tenant of rows without one."),
) -> None:
    """Append judgements to the table's judgements/ after checking every row against
    the candidate table: all rows or, on the first bad one, nothing (exit 2)."""
    from cli.common import absolute, fail
    from pipelines.align.preferences import PreferenceDataError, import_judgements

    try:
        part, n = import_judgements(absolute(file), absolute(table), tenant, source)
    except PreferenceDataError as err:
        fail(str(err))
    typer.echo(f"imported {n} judgement(s) into {part}")
