"""Preference data: a versioned Parquet table of ranked candidate clips.

One row per candidate clip. Candidates of one ``group_id`` answer the same prompt
(and references) from one shared initial noise, so within a group they differ only
by the sampler's exploration noise; per-head scores and ranks compare them.

Columns (``SCHEMA_VERSION`` 1; the table's metadata carries the version):

- ``group_id`` (str), ``candidate`` (int32): the group and the candidate's index in it;
- ``prompt`` (str); ``references`` (str, JSON: ``{"images": [URI...], "videos": [...],
  "audios": [...]}``, empty lists when none);
- ``seed`` (int64): the group's initial-noise seed; ``noise_seed`` (int64): the
  candidate's exploration-noise seed;
- ``clip_uri`` (str): the candidate as MP4 ("" if not written); ``latent_uri`` (str):
  its video and audio latents as safetensors ("" for clips rated without them, e.g.
  by people: the reward model then encodes ``clip_uri`` with the VAE);
- ``score_<head>`` (float64, null when the head does not apply) and ``rank_<head>``
  (int32, 0 = best in the group, null likewise) for every head in
  :data:`pipelines.align.config.HEADS`;
- ``rater_id`` (str): ``probe-rater-v1`` for the programmatic rater, any other id for
  people; ``split`` (str): ``train`` or ``val`` (groups held out from the reward model).

Human rankings drop into the same table: fill ranks (and scores if there are any;
ranks alone order pairs) with another ``rater_id``.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from pipelines.align.config import HEADS

SCHEMA_VERSION = 1
TABLE_NAME = "preferences.parquet"


class PreferenceDataError(ValueError):
    """A preference table that does not fit the schema."""


def schema() -> pa.Schema:
    fields = [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("candidate", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("references", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("noise_seed", pa.int64(), nullable=False),
        pa.field("clip_uri", pa.string(), nullable=False),
        pa.field("latent_uri", pa.string(), nullable=False),
    ]
    fields += [pa.field(f"score_{h}", pa.float64()) for h in HEADS]
    fields += [pa.field(f"rank_{h}", pa.int32()) for h in HEADS]
    fields += [
        pa.field("rater_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata={"schema_version": str(SCHEMA_VERSION)})


NO_REFERENCES = json.dumps({"images": [], "videos": [], "audios": []})


def write_preferences(uri: str, rows: list[dict]) -> str:
    """Write rows (dicts with the schema's columns) as the versioned table at ``uri``."""
    if not rows:
        raise PreferenceDataError("no preference rows to write")
    table = pa.Table.from_pylist(rows, schema=schema())
    with storage.local_output(uri) as path:
        pq.write_table(table, path)
    return uri


def read_preferences(uri: str) -> list[dict]:
    """Rows of a preference table, after checking its version and columns."""
    if not storage.exists(uri):
        raise PreferenceDataError(f"{uri}: no preference table")
    with storage.local_copy(uri) as path:
        table = pq.read_table(path)
    meta = table.schema.metadata or {}
    version = meta.get(b"schema_version", b"").decode()
    if version != str(SCHEMA_VERSION):
        raise PreferenceDataError(
            f"{uri}: preference schema version {version or 'missing'}, expected {SCHEMA_VERSION}"
        )
    missing = set(schema().names) - set(table.schema.names)
    if missing:
        raise PreferenceDataError(f"{uri}: missing columns {sorted(missing)}")
    return table.to_pylist()


def groups(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["group_id"], []).append(row)
    for members in out.values():
        members.sort(key=lambda r: r["candidate"])
    return out


def preference_pairs(rows: list[dict], head: str, min_margin: float) -> list[tuple[dict, dict]]:
    """(winner, loser) pairs of one head within each group.

    Scores decide where both candidates have one (a difference under ``min_margin``
    is no preference); otherwise ranks do (a human ranking without scores).
    """
    pairs = []
    for members in groups(rows).values():
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                sa, sb = a[f"score_{head}"], b[f"score_{head}"]
                if sa is not None and sb is not None:
                    if abs(sa - sb) < min_margin:
                        continue
                    pairs.append((a, b) if sa > sb else (b, a))
                    continue
                ra, rb = a[f"rank_{head}"], b[f"rank_{head}"]
                if ra is None or rb is None or ra == rb:
                    continue
                pairs.append((a, b) if ra < rb else (b, a))
    return pairs
