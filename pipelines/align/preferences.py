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

**Pairwise judgements** (the serve app's ``/rank`` page, ``duet prefs import``) live
in a second versioned table beside the first: ``judgements/`` next to
``preferences.parquet``, one Parquet part per write (``JUDGEMENT_SCHEMA_VERSION`` 1
in each part's metadata). Why not a bumped version of the candidate table: a
judgement is about two candidates, not one, and arrives one at a time from a web
page; appending a part never rewrites (or races on) the candidate table or other
raters' rows, and the candidate table keeps its version, so every reader of it is
unchanged. Columns:

- ``judgement_id`` (str, unique); ``left``, ``right`` (str): candidate ids
  (:func:`candidate_id`: ``<group_id>-c<candidate>``) of the candidate table;
- ``prompt`` (str): the prompt both candidates answer;
- ``choice_<head>`` (str, null when the head was not asked): ``left``, ``right``,
  ``tie`` or ``skip``, for every head of :data:`pipelines.align.config.HEADS`;
- ``rater_id`` (str, :data:`RATER_ID_PATTERN`); ``source`` (str): ``human`` or
  ``rater`` (a program's judgements); ``tenant`` (str): who wrote it (the API key's
  tenant; ``duet prefs import --tenant``); ``created_at`` (timestamp, UTC).

:func:`weighted_pairs` turns both tables into ``(winner, loser, weight, source)``
per head, the weight set per source (``rlhf.reward.human_weight`` /
``rater_weight``); ties and skips order nothing.
"""

from __future__ import annotations

import csv
import datetime
import json
import posixpath
import re
import uuid
from typing import NamedTuple

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


# ---------------------------------------------------------------------------------
# Pairwise judgements: people on the /rank page or in an imported file, or a program.

JUDGEMENT_SCHEMA_VERSION = 1
READABLE_JUDGEMENT_VERSIONS = (1,)
JUDGEMENTS_DIR = "judgements"
CHOICES = ("left", "right", "tie", "skip")
SOURCES = ("human", "rater")
# The programmatic rater's id (rlhf.preferences.rater_id): ranks in the candidate
# table by any other id are people's.
PROGRAMMATIC_RATER_ID = "probe-rater-v1"
# A rater id is shown on pages and written to files: short, printable, no separators.
RATER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_RATER_ID = re.compile(RATER_ID_PATTERN)
_TENANT = re.compile(TENANT_PATTERN)
_JUDGEMENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
BASE_COLUMNS = (
    "judgement_id", "left", "right", "prompt", "rater_id", "source", "tenant", "created_at",
)  # fmt: skip
REQUIRED_IMPORT_COLUMNS = ("left", "right", "rater_id")


def candidate_id(row: dict) -> str:
    """A candidate's id in judgements: ``<group_id>-c<candidate>`` (its clip's file name)."""
    return f"{row['group_id']}-c{row['candidate']}"


def judgements_uri(table_uri: str) -> str:
    """The judgements folder beside a candidate table."""
    if storage.scheme_of(table_uri) == "file" and not table_uri.startswith("file://"):
        import os

        return os.path.join(os.path.dirname(os.path.abspath(table_uri)), JUDGEMENTS_DIR)
    return posixpath.join(posixpath.dirname(table_uri.rstrip("/")), JUDGEMENTS_DIR)


def judgement_schema() -> pa.Schema:
    fields = [
        pa.field("judgement_id", pa.string(), nullable=False),
        pa.field("left", pa.string(), nullable=False),
        pa.field("right", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
    ]
    fields += [pa.field(f"choice_{h}", pa.string()) for h in HEADS]
    fields += [
        pa.field("rater_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    meta = {"schema_version": str(JUDGEMENT_SCHEMA_VERSION), "table": "judgements"}
    return pa.schema(fields, metadata=meta)


def _when(value, where: str) -> datetime.datetime:
    """A UTC time from a datetime, an ISO 8601 string or epoch seconds (naive = UTC)."""
    if isinstance(value, datetime.datetime):
        when = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        when = datetime.datetime.fromtimestamp(float(value), datetime.UTC)
    elif isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as err:
            raise PreferenceDataError(
                f"{where}: created_at {value[:40]!r} is not an ISO 8601 time"
            ) from err
    else:
        raise PreferenceDataError(f"{where}: created_at must be a time, got {type(value).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.astimezone(datetime.UTC)


def _text(raw: dict, key: str, where: str, required: bool) -> str | None:
    value = raw.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise PreferenceDataError(f"{where}: {key} is empty")
        return None
    if not isinstance(value, str):
        raise PreferenceDataError(f"{where}: {key} must be text, got {type(value).__name__}")
    return value.strip()


def make_judgement(
    raw: dict,
    candidates: dict[str, dict],
    *,
    tenant: str,
    source: str = "human",
    where: str = "judgement",
    now: datetime.datetime | None = None,
) -> dict:
    """A checked judgement row from ``raw`` (``left``, ``right``, ``rater_id``,
    ``choice_<head>``; optionally ``prompt``, ``source``, ``tenant``, ``created_at``,
    ``judgement_id``) against the candidate table's rows by :func:`candidate_id`.
    Raises :class:`PreferenceDataError` naming ``where`` and the first bad field."""
    left = _text(raw, "left", where, True)
    right = _text(raw, "right", where, True)
    for side, cid in (("left", left), ("right", right)):
        if cid not in candidates:
            raise PreferenceDataError(f"{where}: {side} {cid[:80]!r} is no candidate of the table")
    if left == right:
        raise PreferenceDataError(f"{where}: left and right are the same candidate {left!r}")
    prompt = candidates[left]["prompt"]
    if candidates[right]["prompt"] != prompt:
        raise PreferenceDataError(
            f"{where}: {left} and {right} answer different prompts; a judgement compares "
            "two answers to one prompt"
        )
    given = _text(raw, "prompt", where, False)
    if given is not None and given != prompt.strip():
        raise PreferenceDataError(
            f"{where}: prompt {given[:60]!r} is not the candidates' prompt {prompt[:60]!r}"
        )
    rater = _text(raw, "rater_id", where, True)
    if not _RATER_ID.match(rater):
        raise PreferenceDataError(
            f"{where}: rater_id {rater[:80]!r} must be 1-64 letters, digits, '.', '_', '@' "
            "or '-', starting with a letter or digit"
        )
    row_source = _text(raw, "source", where, False) or source
    if row_source not in SOURCES:
        raise PreferenceDataError(f"{where}: source {row_source[:40]!r} is not one of {SOURCES}")
    row_tenant = _text(raw, "tenant", where, False) or tenant
    if not _TENANT.match(row_tenant):
        raise PreferenceDataError(f"{where}: tenant {row_tenant[:80]!r} is not a tenant name")
    jid = _text(raw, "judgement_id", where, False) or uuid.uuid4().hex
    if not _JUDGEMENT_ID.match(jid):
        raise PreferenceDataError(f"{where}: judgement_id {jid[:80]!r}: 1-64 of [A-Za-z0-9._-]")
    row = {"judgement_id": jid, "left": left, "right": right, "prompt": prompt}
    for h in HEADS:
        choice = _text(raw, f"choice_{h}", where, False)
        if choice is not None and choice not in CHOICES:
            raise PreferenceDataError(
                f"{where}: choice_{h} {choice[:40]!r} is not one of {', '.join(CHOICES)} "
                "(or empty: not asked)"
            )
        row[f"choice_{h}"] = choice
    if all(row[f"choice_{h}"] is None for h in HEADS):
        raise PreferenceDataError(f"{where}: no head has a choice (choice_<head> for {HEADS})")
    created = raw.get("created_at")
    if created is None or created == "":
        created = now or datetime.datetime.now(datetime.UTC)
    row.update(
        rater_id=rater, source=row_source, tenant=row_tenant, created_at=_when(created, where)
    )
    return row


def append_judgements(table_uri: str, rows: list[dict]) -> str:
    """Write ``rows`` (checked by :func:`make_judgement`) as one new part beside the
    table; returns its URI. One object, written whole: readers see all rows or none."""
    if not rows:
        raise PreferenceDataError("no judgements to write")
    table = pa.Table.from_pylist(rows, schema=judgement_schema())
    stamp = int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)
    uri = storage.join(judgements_uri(table_uri), f"{stamp:013d}-{uuid.uuid4().hex}.parquet")
    with storage.local_output(uri) as path:
        pq.write_table(table, path)
    return uri


def judgement_parts(table_uri: str) -> list[str]:
    return storage.list_files(judgements_uri(table_uri), (".parquet",))


def read_judgement_part(uri: str) -> list[dict]:
    """Rows of one judgements part, after checking its version and columns. A head
    added to HEADS after the part was written reads as not asked (null)."""
    with storage.local_copy(uri) as path:
        table = pq.read_table(path)
    meta = table.schema.metadata or {}
    version = meta.get(b"schema_version", b"").decode()
    if meta.get(b"table") != b"judgements" or not version.isdigit():
        raise PreferenceDataError(f"{uri}: not a judgements part (schema_version {version!r})")
    if int(version) not in READABLE_JUDGEMENT_VERSIONS:
        raise PreferenceDataError(
            f"{uri}: judgements schema version {version}; this reader reads "
            f"{READABLE_JUDGEMENT_VERSIONS}"
        )
    missing = set(BASE_COLUMNS) - set(table.schema.names)
    if missing:
        raise PreferenceDataError(f"{uri}: missing columns {sorted(missing)}")
    rows = table.to_pylist()
    for row in rows:
        for h in HEADS:
            row.setdefault(f"choice_{h}", None)
    return rows


def read_judgements(table_uri: str, tenant: str | None = None) -> list[dict]:
    """Every judgement beside a candidate table (``tenant``: that tenant's only),
    oldest first."""
    rows = [r for part in judgement_parts(table_uri) for r in read_judgement_part(part)]
    if tenant is not None:
        rows = [r for r in rows if r["tenant"] == tenant]
    rows.sort(key=lambda r: (r["created_at"], r["judgement_id"]))
    return rows


def read_import_file(uri: str) -> list[dict]:
    """Raw rows of a CSV (text cells, UTF-8, a header line) or Parquet file."""
    name = uri.lower()
    if name.endswith(".parquet"):
        with storage.local_copy(uri) as path:
            try:
                return pq.read_table(path).to_pylist()
            except (pa.ArrowException, OSError) as err:
                raise PreferenceDataError(f"{uri}: not a readable Parquet file: {err}") from err
    if not name.endswith(".csv"):
        raise PreferenceDataError(f"{uri}: expected a .csv or .parquet file")
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PreferenceDataError(f"{uri}: not UTF-8 text ({err.reason})") from err
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    if len(set(header)) != len(header):
        raise PreferenceDataError(f"{uri}: repeated column names in the header {header}")
    rows = []
    for i, row in enumerate(reader, start=1):
        if None in row:
            raise PreferenceDataError(f"{uri}: row {i} has more cells than the header")
        if any(v is None for v in row.values()):
            raise PreferenceDataError(f"{uri}: row {i} has fewer cells than the header")
        rows.append(row)
    return rows


def import_judgements(
    file_uri: str, table_uri: str, tenant: str = "default", source: str = "human"
) -> tuple[str, int]:
    """Check every row of a CSV/Parquet file of judgements against the candidate table
    and append them as one part: all rows or, on the first bad one, nothing. Returns
    the part's URI and the row count."""
    candidates = {candidate_id(r): r for r in read_preferences(table_uri)}
    raw = read_import_file(file_uri)
    if not raw:
        raise PreferenceDataError(f"{file_uri}: no rows")
    known = {*BASE_COLUMNS, *(f"choice_{h}" for h in HEADS)}
    columns = list(raw[0])
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise PreferenceDataError(
            f"{file_uri}: unknown column(s) {unknown}; known: left, right, rater_id, "
            f"choice_<head> for {', '.join(HEADS)}, prompt, source, tenant, created_at, "
            "judgement_id"
        )
    missing = [c for c in REQUIRED_IMPORT_COLUMNS if c not in columns]
    if missing or not any(c.startswith("choice_") for c in columns):
        raise PreferenceDataError(
            f"{file_uri}: missing column(s) {missing or ['choice_<head>']} (needs left, "
            "right, rater_id and a choice_<head> per judged head)"
        )
    if source not in SOURCES:
        raise PreferenceDataError(f"source {source!r} is not one of {SOURCES}")
    if not _TENANT.match(tenant):
        raise PreferenceDataError(f"tenant {tenant[:80]!r} is not a tenant name")
    now = datetime.datetime.now(datetime.UTC)
    rows = [
        make_judgement(r, candidates, tenant=tenant, source=source, where=f"{file_uri}: row {i}",
                       now=now)
        for i, r in enumerate(raw, start=1)
    ]  # fmt: skip
    seen = {r["judgement_id"] for r in read_judgements(table_uri)}
    for i, row in enumerate(rows, start=1):
        if row["judgement_id"] in seen:
            raise PreferenceDataError(
                f"{file_uri}: row {i}: judgement_id {row['judgement_id']!r} is already in "
                "the table (imported twice?)"
            )
        seen.add(row["judgement_id"])
    return append_judgements(table_uri, rows), len(rows)


# ---------------------------------------------------------------------------------
# Weighted pairs: what the reward model trains on.


class Pair(NamedTuple):
    """One preference of one head: ``winner`` and ``loser`` are rows of the candidate
    table (the same dict objects), ``weight`` the pair's weight in the loss."""

    winner: dict
    loser: dict
    weight: float
    source: str  # "human" | "rater"


def weighted_pairs(
    rows: list[dict],
    head: str,
    min_margin: float,
    judgements: list[dict] = (),
    *,
    human_weight: float = 1.0,
    rater_weight: float = 1.0,
    rater_id: str = PROGRAMMATIC_RATER_ID,
) -> list[Pair]:
    """Pairs of one head from the candidate table's scores and ranks
    (:func:`preference_pairs`; a group ranked by ``rater_id`` is the rater's, by anyone
    else people's) and from pairwise ``judgements`` whose candidates are both in
    ``rows`` (so a subset of rows, one split, keeps its own pairs). Ties and skips
    order nothing; a source of weight 0 gives no pairs."""
    weight = {"human": float(human_weight), "rater": float(rater_weight)}
    out = []
    for w, lo in preference_pairs(rows, head, min_margin):
        source = "rater" if w["rater_id"] == lo["rater_id"] == rater_id else "human"
        out.append(Pair(w, lo, weight[source], source))
    by_id = {candidate_id(r): r for r in rows}
    for j in judgements:
        choice = j.get(f"choice_{head}")
        if choice not in ("left", "right"):
            continue
        a, b = by_id.get(j["left"]), by_id.get(j["right"])
        if a is None or b is None:
            continue
        w, lo = (a, b) if choice == "left" else (b, a)
        out.append(Pair(w, lo, weight[j["source"]], j["source"]))
    return [p for p in out if p.weight > 0]
