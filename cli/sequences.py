"""``duet sequences --curated URI``: multi-shot training sequences from curated footage.

A step between ``duet curate`` and ``duet train``: consecutive detected shots of a
source (cuts and fades as filmed, every shot with a kept, captioned clip) are cut
into one file each, and ``sequences.parquet`` goes beside the clips table, where
training finds it (``pipelines.train.sequences``). Without it, multi-shot steps of
training are skipped on real footage.
"""

from __future__ import annotations

import typer


def sequences(
    curated: str = typer.Option(
        ..., "--curated", help="Curated dataset URI (the --out folder of `duet curate`)."
    ),
    out: str | None = typer.Option(
        None, "--out", help="Where the sequence files go (default: the curated folder)."
    ),
    max_shots: int = typer.Option(4, "--max-shots", help="Shots per sequence, at most (>= 2)."),
    max_duration_s: float = typer.Option(
        12.0, "--max-duration-s", help="Seconds per sequence, at most."
    ),
) -> None:
    """Cut multi-shot sequences (2..N consecutive shots, cuts and fades as filmed) from
    curated footage for training; rerun after a new curation."""
    from cli.common import absolute, fail
    from core import storage
    from core.manifest_layout import manifest_table_uri
    from pipelines.train.data import clips_table_uri
    from pipelines.train.sequences import MIN_SHOTS

    # Checked before any file is read or written: a bad value is one line, exit 2.
    if max_shots < MIN_SHOTS:
        fail(f"--max-shots must be >= {MIN_SHOTS}, got {max_shots}")
    if not max_duration_s > 0:
        fail(f"--max-duration-s must be > 0, got {max_duration_s}")
    curated = absolute(curated)
    out = absolute(out) or curated
    if curated.endswith(".parquet") or not storage.exists(clips_table_uri(curated)):
        fail(f"no manifest under {curated}: name the --out folder of `duet curate`")
    if not storage.exists(manifest_table_uri(curated, "shots")):
        fail(f"{curated} has no shots table: curate the footage again with this Duet")

    table, rows = cut_sequences(curated, out, max_shots, max_duration_s)
    shots = sum(len(r["shot_start_frames"]) for r in rows)
    # Plain print: the path stays on one line for scripts, whatever the terminal width.
    print(f"sequences: {len(rows)} ({shots} shots) in {table}")


def cut_sequences(
    curated: str, out: str, max_shots: int = 4, max_duration_s: float = 12.0
) -> tuple[str, list[dict]]:
    """Run :func:`pipelines.train.sequences.sequences_from_footage` (absolute URIs)
    with a live bar on stderr; warn when no sequence came out. Returns the table's
    URI and its rows (``duet train --sequences`` runs this too)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cli.common import warn
    from pipelines.train.sequences import read_records, sequences_from_footage

    columns = (TextColumn("sequences"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("sequences", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        table = sequences_from_footage(curated, out, max_shots, max_duration_s, on_progress)
    rows = read_records(table)
    if not rows:
        warn(
            "no sequences: no two consecutive shots of a source, joined by a cut or fade, "
            "both have a kept, captioned clip (multi-shot training steps are skipped)"
        )
    return table, rows
