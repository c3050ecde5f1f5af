"""The run report: one HTML page with PNG plots beside it.

Score histograms (kept vs dropped), kept/dropped counts per filter, clip
durations, sync offsets, the quarantine table and the run's timings. Everything
is computed from the manifest tables, so the report matches what was written.
"""

from __future__ import annotations

import html
import io
from typing import Any

import numpy as np
import pyarrow as pa

from core import storage
from curation.manifest import SCORE_NAMES, VERDICT_NAMES


def _png(fig) -> bytes:
    """The figure as PNG bytes, laid out once (``bbox_inches="tight"`` would draw every
    figure a second time to measure it: a third of the report's seconds)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _plots(clips: pa.Table) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    keep = (
        np.asarray(clips.column("keep").to_pylist(), dtype=bool)
        if clips.num_rows
        else np.zeros(0, bool)
    )

    names = [n for n in SCORE_NAMES if n not in ("width", "height")]
    cols = 4
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows))
    for ax, name in zip(axes.flat, names, strict=False):
        values = np.array(
            [np.nan if v is None else v for v in clips.column(f"score_{name}").to_pylist()], float
        )
        finite = np.isfinite(values)
        if finite.any():
            bins = np.histogram_bin_edges(values[finite], bins=20)
            ax.hist(values[finite & keep], bins=bins, alpha=0.7, label="kept")
            ax.hist(values[finite & ~keep], bins=bins, alpha=0.7, label="dropped")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if clips.num_rows:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("score histograms")
    out["scores.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    passed = []
    failed = []
    for name in VERDICT_NAMES:
        col = [v for v in clips.column(f"verdict_{name}").to_pylist() if v is not None]
        passed.append(sum(bool(v) for v in col))
        failed.append(sum(not v for v in col))
    x = np.arange(len(VERDICT_NAMES))
    ax.bar(x, passed, label="kept by filter")
    ax.bar(x, failed, bottom=passed, label="dropped by filter")
    ax.set_xticks(x, VERDICT_NAMES, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("kept / dropped per filter")
    out["filters.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    durations = np.array(clips.column("duration_s").to_pylist(), float)
    axes[0].hist(durations, bins=20)
    axes[0].set_title("clip duration (s)")
    offsets = np.array(clips.column("sync_offset_ms").to_pylist(), float)
    axes[1].hist(offsets, bins=30)
    axes[1].set_title("AV sync offset (ms, + = audio late)")
    out["durations.png"] = _png(fig)
    plt.close(fig)
    return out


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def accounting(sources: pa.Table | None, inputs: int | None) -> list[dict[str, Any]]:
    """Rows that show every input went somewhere: curated + no clips + quarantined."""
    if sources is None:
        return []
    statuses = sources.column("status").to_pylist() if sources.num_rows else []
    counts = {s: statuses.count(s) for s in ("curated", "no_clips", "quarantined")}
    total = sum(counts.values())
    rows = [{"metric": f"sources {k}", "value": v} for k, v in counts.items()]
    balanced = inputs is None or inputs == total
    rows.append(
        {
            "metric": "inputs = curated + no_clips + quarantined",
            "value": f"{inputs if inputs is not None else total} = "
            f"{counts['curated']} + {counts['no_clips']} + {counts['quarantined']}"
            + ("" if balanced else "  (MISMATCH)"),
        }
    )
    return rows


def write_report(
    out_uri: str,
    clips: pa.Table,
    quarantine: pa.Table,
    summary: dict[str, Any],
    sources: pa.Table | None = None,
) -> str:
    """Write ``OUT/report/index.html`` and its PNGs; return the HTML's URI."""
    base = storage.join(out_uri, "report")
    images = _plots(clips)
    for name, data in images.items():
        storage.write_bytes(storage.join(base, name), data)
    kept = sum(bool(v) for v in clips.column("keep").to_pylist()) if clips.num_rows else 0
    total_s = float(np.sum(clips.column("duration_s").to_pylist())) if clips.num_rows else 0.0
    summary_rows = [
        {"metric": k, "value": v}
        for k, v in summary.items()
        if not k.startswith("sources ") or k.startswith("sources run")
    ]
    summary_rows = [
        *accounting(sources, summary.get("inputs")),
        {"metric": "clips", "value": clips.num_rows},
        {"metric": "clips kept", "value": kept},
        {"metric": "clip seconds", "value": round(total_s, 2)},
        *summary_rows,
    ]
    no_clips = []
    if sources is not None and sources.num_rows:
        no_clips = [r for r in sources.to_pylist() if r["status"] == "no_clips"]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Duet curation report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}</style></head><body>
<h1>Duet curation report</h1>
<h2>Summary</h2>{_table(summary_rows, ["metric", "value"])}
<h2>Scores</h2><img src="scores.png" alt="score histograms">
<h2>Filters</h2><img src="filters.png" alt="kept and dropped per filter">
<h2>Durations and sync</h2><img src="durations.png" alt="clip durations and sync offsets">
<h2>Quarantine</h2>{_table(quarantine.to_pylist(), ["uri", "stage", "error_type", "reason", "size_bytes"])}
<h2>Sources without clips</h2>{_table(no_clips, ["uri", "media_seconds", "fps", "has_audio"])}
</body></html>
"""
    uri = storage.join(base, "index.html")
    storage.write_text(uri, page)
    return uri
