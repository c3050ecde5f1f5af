"""Training data from a curation manifest: clip rows, buckets and a resumable sampler.

The manifest's ``clips.parquet`` is read with pyarrow (its location comes from
:mod:`core.manifest_layout`, shared with curation). Kept clips of the chosen split
become :class:`ClipRow` s; each goes to the longest frame bucket it covers, so a
batch holds clips of one length. :class:`EpochSampler` turns (seed, epoch) into a
fixed order of global batches; its position ``(epoch, batch)`` is saved in every
checkpoint, so a resumed run sees each sample of the epoch exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core import storage
from core.manifest_layout import manifest_table_uri
from pipelines.train.config import DataConfig


class TrainDataError(ValueError):
    """The manifest cannot feed training: missing, empty, or without usable clips."""


@dataclass(frozen=True)
class ClipRow:
    clip_id: str
    source_id: str
    clip_uri: str
    start_s: float
    num_frames: int  # at the model's frame rate
    bucket: int  # frames the clip is trimmed to
    text: str  # caption plus quoted dialogue
    has_audio: bool
    quality: float  # the SFT subset's score (nan when the manifest lacks it)
    shot_index: int


def conditioning_text(caption: str, transcript: str) -> str:
    """Caption and speech both condition the model; dialogue goes in quotes."""
    caption, transcript = (caption or "").strip(), (transcript or "").strip()
    if transcript:
        return f'{caption} "{transcript}"'.strip()
    return caption


def has_dialogue(text: str) -> bool:
    """Whether a clip's conditioning text quotes speech (a transcript, or a caption
    that quotes its line): the clips a vocoder learns speech from."""
    first = text.find('"')
    return first >= 0 and text.find('"', first + 1) > first + 1


def clips_table_uri(curated_uri: str) -> str:
    if curated_uri.endswith(".parquet"):
        return curated_uri
    return manifest_table_uri(curated_uri, "clips")


def read_clips_table(curated_uri: str) -> pa.Table:
    if not curated_uri:
        raise TrainDataError("data.curated_uri is empty: point it at a curated dataset")
    uri = clips_table_uri(curated_uri)
    if not storage.exists(uri):
        raise TrainDataError(f"no manifest at {uri}: run `duet curate` first")
    with storage.local_copy(uri) as path:
        return pq.read_table(path)


def data_version(curated_uri: str) -> str:
    """Which manifest a stage trained on: the table's URI and its schema version."""
    table = read_clips_table(curated_uri)
    meta = table.schema.metadata or {}
    version = meta.get(b"duet.schema_version", b"?").decode()
    return f"{clips_table_uri(curated_uri)}#schema={version}#rows={table.num_rows}"


def bucket_for(num_frames: int, buckets: tuple[int, ...]) -> int | None:
    fitting = [b for b in buckets if b <= num_frames]
    return max(fitting) if fitting else None


def select_clips(
    table: pa.Table, cfg: DataConfig, fps: float, split: str | None = None
) -> list[ClipRow]:
    """Kept clips of a split that fill at least the shortest bucket."""
    split = split or cfg.split
    cols = set(table.column_names)
    missing = {"clip_id", "source_id", "clip_uri", "start_s", "end_s", "keep"} - cols
    if missing:
        raise TrainDataError(f"manifest lacks columns {sorted(missing)}")
    rows = []
    score_col = f"score_{cfg.sft_quality_score}"
    for rec in table.to_pylist():
        if not rec["keep"] or (split and rec.get("split", split) != split):
            continue
        has_audio = bool(rec.get("has_audio", True))
        if not has_audio and not cfg.use_video_only:
            continue
        n = int(np.floor((rec["end_s"] - rec["start_s"]) * fps + 1e-6))
        bucket = bucket_for(n, cfg.frame_buckets)
        if bucket is None:
            continue
        quality = rec.get(score_col)
        rows.append(
            ClipRow(
                clip_id=rec["clip_id"],
                source_id=rec["source_id"],
                clip_uri=rec["clip_uri"],
                start_s=float(rec["start_s"]),
                num_frames=n,
                bucket=bucket,
                text=conditioning_text(rec.get("caption", ""), rec.get("transcript", "")),
                has_audio=has_audio,
                quality=float("nan") if quality is None else float(quality),
                shot_index=int(rec.get("shot_index", 0)),
            )
        )
    rows.sort(key=lambda r: (r.source_id, r.start_s, r.clip_id))
    return rows


def load_clip_rows(cfg: DataConfig, fps: float, split: str | None = None) -> list[ClipRow]:
    rows = select_clips(read_clips_table(cfg.curated_uri), cfg, fps, split)
    if not rows:
        raise TrainDataError(
            f"{clips_table_uri(cfg.curated_uri)}: no kept clips in split "
            f"{split or cfg.split!r} of at least {min(cfg.frame_buckets)} frames at {fps} fps"
        )
    return rows


def sft_subset(rows: list[ClipRow], top_fraction: float, min_rows: int = 1) -> list[ClipRow]:
    """The highest-quality clips: top fraction by score (all when no scores), and never
    fewer than ``min_rows`` (one global batch) while the data has them: on a small
    corpus half the clips may not fill a batch that all of them can."""
    if not 0 < top_fraction <= 1:
        raise TrainDataError(f"sft_top_fraction must be in (0, 1], got {top_fraction}")
    scored = [r for r in rows if not np.isnan(r.quality)]
    if not scored:
        return rows
    keep = min(len(scored), max(1, min_rows, int(round(len(scored) * top_fraction))))
    threshold = sorted((r.quality for r in scored), reverse=True)[keep - 1]
    return [r for r in scored if r.quality >= threshold]


def decode_clip(row: ClipRow, pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, bucket, H, W) video in [-1, 1] and (2, N) padded audio at the model's rate."""
    from core.media import read_clip

    clip = read_clip(row.clip_uri, require_audio=False)
    return pipeline.clip_to_tensors(clip, num_frames=row.bucket)


@dataclass
class SamplerPosition:
    epoch: int = 0
    batch: int = 0  # next global batch within the epoch


class EpochSampler:
    """Deterministic global batches: a function of (seed, epoch) only.

    Within an epoch, every clip appears once (batches are drawn within a bucket; the
    remainder of a bucket that does not fill a global batch waits for the next
    epoch's shuffle). Rank r of W takes rows ``r::W`` of each global batch.
    """

    def __init__(self, rows: list, batch_per_worker: int, world_size: int, seed: int):
        if batch_per_worker < 1:
            raise TrainDataError("batch_size must be >= 1")
        self.rows = rows
        self.global_batch = batch_per_worker * world_size
        self.world_size = world_size
        self.seed = seed
        by_bucket: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_bucket.setdefault(getattr(row, "bucket", 0), []).append(i)
        self.by_bucket = by_bucket
        if not any(len(v) >= self.global_batch for v in by_bucket.values()):
            raise TrainDataError(
                f"{len(rows)} clips cannot fill one global batch of {self.global_batch} "
                f"({batch_per_worker} per worker x {world_size} workers) in any bucket"
            )
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self.by_bucket):
            idx = self.by_bucket[bucket]
            order = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
            full = len(order) // self.global_batch
            batches += [
                order[k * self.global_batch : (k + 1) * self.global_batch] for k in range(full)
            ]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        self._epoch_cache = (epoch, shuffled)
        return shuffled

    def next(self, pos: SamplerPosition, rank: int) -> tuple[list[int], SamplerPosition]:
        """This rank's indices of the batch at ``pos`` and the position after it."""
        batches = self.epoch_batches(pos.epoch)
        if pos.batch >= len(batches):
            pos = SamplerPosition(pos.epoch + 1, 0)
            batches = self.epoch_batches(pos.epoch)
        batch = batches[pos.batch]
        return batch[rank :: self.world_size], SamplerPosition(pos.epoch, pos.batch + 1)
