"""Where a curated dataset keeps its manifest tables: shared by curation and training.

Curation writes the tables; training (``pipelines``), which may not import
``curation``, finds them through this module, so the layout is defined once.

Layout (one directory per run, Hive-style so polars and duckdb read a version, or
all of them, by path)::

    OUT/manifest/v=000001/clips.parquet      (and quarantine, shots, sources)
    OUT/manifest/v=000001/_run.json          (config, fingerprint, counts)
    OUT/manifest/v=000002/...
    OUT/manifest/_latest.json                {"version": 2, ...}, written last

A run writes a new version directory and moves the pointer only when every table
is complete, so readers see either the old version or the whole new one. Old
versions stay as they are. Datasets from before versioning (tables directly under
``manifest/``) are still found.
"""

from __future__ import annotations

from core import storage

TABLES = ("clips", "quarantine", "shots", "sources")
LATEST_POINTER = "_latest.json"


def manifest_root(curated_uri: str) -> str:
    return storage.join(curated_uri, "manifest")


def version_uri(curated_uri: str, version: int) -> str:
    return storage.join(manifest_root(curated_uri), f"v={version:06d}")


def latest_version(curated_uri: str) -> int | None:
    """The version the pointer names, or None when no versioned manifest exists."""
    pointer = storage.join(manifest_root(curated_uri), LATEST_POINTER)
    if not storage.exists(pointer):
        return None
    return int(storage.read_json(pointer)["version"])


def manifest_table_uri(curated_uri: str, table: str = "clips", version: int | None = None) -> str:
    """URI of one manifest table of a curated dataset: the newest version's unless
    ``version`` is given."""
    if table not in TABLES:
        raise ValueError(f"unknown manifest table {table!r}; choose one of {TABLES}")
    if version is None:
        version = latest_version(curated_uri)
    if version is None:
        return storage.join(manifest_root(curated_uri), f"{table}.parquet")
    return storage.join(version_uri(curated_uri, version), f"{table}.parquet")
