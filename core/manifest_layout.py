"""Where a curated dataset keeps its manifest tables: shared by curation and training.

Curation writes the tables; training (``pipelines``), which may not import
``curation``, finds them through this module, so the layout is defined once.
"""

from __future__ import annotations

from core import storage

TABLES = ("clips", "quarantine", "shots")


def manifest_table_uri(curated_uri: str, table: str = "clips") -> str:
    """URI of the newest version of one manifest table of a curated dataset."""
    if table not in TABLES:
        raise ValueError(f"unknown manifest table {table!r}; choose one of {TABLES}")
    return storage.join(curated_uri, "manifest", f"{table}.parquet")
