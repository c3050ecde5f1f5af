"""Ad-variant briefs: read one, expand it into variants, keep the results table.

A brief (TOML/JSON, CSV or Parquet) names prompt templates with slots (colour,
setting, voice line, ...), seeds, durations, aspect ratios, product references and a
quality. :func:`expand_brief` turns it into :class:`Variant` s, each with an id that
is a hash of everything that decides its clip, so a rerun recognises the variants
it already made. The results table (:data:`RESULTS_SCHEMA`, ``schema_version`` in
every row and in the file's metadata) has one row per variant.

TOML example::

    name = "sneaker-launch"
    prompt_templates = ["a {colour} sneaker on a {setting}. Voice: {voice_line}"]
    seeds = [0, 1]
    durations = [2.0]
    aspect_ratios = ["1:1", "9:16"]
    quality = "fast"
    product_references = ["s3://brand-assets/sneaker.png"]
    [slots]
    colour = ["red", "blue"]
    setting = ["beach", "city street"]
    voice_line = ["just run"]

A CSV or Parquet brief has one row per variant: ``prompt`` (a template filled from
the row's other columns) and optional ``seed``, ``duration_s``, ``aspect_ratio``,
``quality``, ``negative_prompt``, ``product_references`` (``;``-separated URIs),
``variant_id``; every other column is a slot.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import string
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from core import storage
from core.config import config_from_dict, parse_config_text

RESULTS_SCHEMA_VERSION = 1
QUALITIES = ("fast", "full")


class BriefError(ValueError):
    """A brief that cannot be expanded: the message says which field and why."""


@dataclass
class AdBrief:
    name: str = "brief"
    prompt_templates: tuple[str, ...] = ()
    slots: dict[str, list[str]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    durations: tuple[float, ...] = (2.0,)
    aspect_ratios: tuple[str, ...] = ("1:1",)
    quality: str = "fast"
    negative_prompt: str = ""
    product_references: tuple[str, ...] = ()
    max_variants: int = 1000

    def validate(self) -> AdBrief:
        if not self.prompt_templates:
            raise ValueError("prompt_templates: at least one template is needed")
        if self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {self.quality!r}")
        if not self.seeds or not self.durations or not self.aspect_ratios:
            raise ValueError("seeds, durations and aspect_ratios need at least one value each")
        for name, values in self.slots.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"slots.{name}: a non-empty list of values is needed")
        return self


@dataclass
class Variant:
    variant_id: str
    prompt: str
    negative_prompt: str
    slots: dict[str, str]
    seed: int
    duration_s: float
    aspect_ratio: str
    quality: str
    product_references: list[str]

    def job(self, resolution: str | None) -> dict:
        """The API job for this variant."""
        body = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "duration_s": self.duration_s,
            "quality": self.quality,
            "references": {"images": list(self.product_references)},
        }
        if resolution:
            body["resolution"] = resolution
        return body


def _fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as err:
        raise BriefError(f"prompt template {template!r}: {err}") from err


def variant_id_for(params: dict) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return "v-" + hashlib.sha1(text.encode()).hexdigest()[:12]


def _make_variant(prompt_template: str, slots: dict[str, str], seed, duration, aspect, quality,
                  negative, refs, given_id: str | None = None) -> Variant:  # fmt: skip
    missing = [f for f in _fields(prompt_template) if f not in slots]
    if missing:
        raise BriefError(f"prompt template {prompt_template!r} uses unknown slot(s) {missing}")
    prompt = prompt_template.format(**slots)
    params = {
        "prompt": prompt, "negative_prompt": negative, "seed": int(seed),
        "duration_s": float(duration), "aspect_ratio": aspect, "quality": quality,
        "product_references": list(refs),
    }  # fmt: skip
    return Variant(
        variant_id=given_id or variant_id_for(params),
        slots=dict(slots),
        **params,
    )


def expand_brief(brief: AdBrief) -> list[Variant]:
    """Every combination of template x slot values x seed x duration x aspect ratio."""
    brief.validate()
    names = sorted(brief.slots)
    variants: list[Variant] = []
    seen: set[str] = set()
    for template in brief.prompt_templates:
        used = [n for n in names if n in _fields(template)]
        for values in itertools.product(*(brief.slots[n] for n in used)):
            slots = dict(zip(used, (str(v) for v in values), strict=True))
            for seed, duration, aspect in itertools.product(
                brief.seeds, brief.durations, brief.aspect_ratios
            ):
                v = _make_variant(template, slots, seed, duration, aspect, brief.quality,
                                  brief.negative_prompt, brief.product_references)  # fmt: skip
                if v.variant_id not in seen:
                    seen.add(v.variant_id)
                    variants.append(v)
                if len(variants) > brief.max_variants:
                    raise BriefError(
                        f"the brief expands to more than max_variants={brief.max_variants} "
                        "variants; raise max_variants or narrow the slots"
                    )
    return variants


_ROW_COLUMNS = {"prompt", "seed", "duration_s", "aspect_ratio", "quality", "negative_prompt",
                "product_references", "variant_id"}  # fmt: skip


def variants_from_rows(rows: list[dict], name: str) -> list[Variant]:
    variants = []
    for i, row in enumerate(rows):
        where = f"{name} row {i + 1}"
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BriefError(f"{where}: a 'prompt' is needed")
        quality = str(row.get("quality") or "fast")
        if quality not in QUALITIES:
            raise BriefError(f"{where}: quality must be one of {QUALITIES}, got {quality!r}")
        slots = {k: str(v) for k, v in row.items() if k not in _ROW_COLUMNS and v is not None}
        refs = [u for u in str(row.get("product_references") or "").split(";") if u.strip()]
        try:
            seed = int(row.get("seed") if row.get("seed") not in (None, "") else 0)
            duration = float(
                row.get("duration_s") if row.get("duration_s") not in (None, "") else 2.0
            )  # noqa: E501
        except (TypeError, ValueError) as err:
            raise BriefError(f"{where}: seed and duration_s must be numbers: {err}") from err
        given = str(row["variant_id"]) if row.get("variant_id") not in (None, "") else None
        variants.append(
            _make_variant(
                prompt,
                slots,
                seed,
                duration,
                str(row.get("aspect_ratio") or "1:1"),
                quality,
                str(row.get("negative_prompt") or ""),
                refs,
                given,
            )  # fmt: skip
        )
    ids = [v.variant_id for v in variants]
    if len(set(ids)) != len(ids):
        raise BriefError(f"{name}: variant ids repeat (two rows make the same variant)")
    return variants


def load_brief(uri: str) -> tuple[str, list[Variant]]:
    """``(brief name, variants)`` from a TOML/JSON, CSV or Parquet brief at any URI."""
    lower = uri.lower()
    base = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if lower.endswith((".toml", ".json")):
        data = parse_config_text(storage.read_text(uri), uri)
        try:
            brief = config_from_dict(AdBrief, data, path=base)
        except ValueError as err:
            raise BriefError(str(err)) from err
        return brief.name, expand_brief(brief)
    if lower.endswith(".csv"):
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO(storage.read_text(uri))))
        return base, variants_from_rows(rows, uri)
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage.local_copy(uri) as path:
            rows = pq.read_table(path).to_pylist()
        return base, variants_from_rows(rows, uri)
    raise BriefError(f"{uri}: a brief is .toml, .json, .csv or .parquet")


RESULTS_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("variant_id", pa.string()),
        ("brief", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("slots_json", pa.string()),
        ("seed", pa.int64()),
        ("duration_s", pa.float64()),
        ("aspect_ratio", pa.string()),
        ("resolution", pa.string()),
        ("quality", pa.string()),
        ("status", pa.string()),  # succeeded | failed
        ("error", pa.string()),
        ("job_id", pa.string()),
        ("output_uri", pa.string()),
        ("latency_s", pa.float64()),
        ("compute_s", pa.float64()),
        ("cost_estimate", pa.float64()),
        ("probe_duration_s", pa.float64()),
        ("probe_width", pa.int32()),
        ("probe_height", pa.int32()),
        ("probe_fps", pa.float64()),
        ("probe_has_audio", pa.bool_()),
        ("probe_audio_rms", pa.float64()),
        ("probe_mean_luma", pa.float64()),
        ("finished_at", pa.float64()),
    ],
    metadata={"schema_version": str(RESULTS_SCHEMA_VERSION)},
)


def result_row(variant: Variant, brief: str, **values) -> dict:
    row = {name: None for name in RESULTS_SCHEMA.names}
    row.update(
        schema_version=RESULTS_SCHEMA_VERSION, variant_id=variant.variant_id, brief=brief,
        prompt=variant.prompt, negative_prompt=variant.negative_prompt,
        slots_json=json.dumps(variant.slots, sort_keys=True), seed=variant.seed,
        duration_s=variant.duration_s, aspect_ratio=variant.aspect_ratio, quality=variant.quality,
    )  # fmt: skip
    unknown = set(values) - set(RESULTS_SCHEMA.names)
    if unknown:
        raise KeyError(f"not result columns: {sorted(unknown)}")
    row.update(values)
    return row


def read_results(uri: str) -> list[dict]:
    """Rows of an existing results table (empty if there is none); refuses a newer schema."""
    import pyarrow.parquet as pq

    if not storage.exists(uri):
        return []
    with storage.local_copy(uri) as path:
        table = pq.read_table(path)
    version = int((table.schema.metadata or {}).get(b"schema_version", b"0"))
    if version > RESULTS_SCHEMA_VERSION:
        raise ValueError(f"{uri}: results schema {version} is newer than this Duet's")
    return table.to_pylist()


def write_results(uri: str, rows: list[dict]) -> None:
    import io

    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [{name: r.get(name) for name in RESULTS_SCHEMA.names} for r in rows], schema=RESULTS_SCHEMA
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def variant_dict(variant: Variant) -> dict:
    return asdict(variant)
