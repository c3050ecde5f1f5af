"""Multi-shot training sequences: continuous footage of 2..N shots, encoded once.

A sequence is ONE video+audio file holding consecutive shots of one source as the
footage has them (hard cuts, dips to black). Its manifest row (``sequences.parquet``
beside the clips table, :data:`SEQUENCE_SCHEMA`, versioned) lists the frame where
each shot starts, the kind of each boundary, a caption per shot and a subject
caption. The VAEs encode the whole file once, like any clip, so the sequence has one
first-frame latent and one front pad of audio, at its start, and none at its cuts
(stitching separately encoded clips put a first-frame-only latent and ~190 ms of
padding silence at every cut, which generation never produces). The text is the
plan's text (:func:`model.multishot.plan_segments`: subject, transition words,
per-shot captions, one token sequence of at most ``text.max_tokens``), and each
latent step reads its own shot's tokens (:func:`model.multishot.latent_shots` on the
shot boundaries), exactly as :func:`model.generate.generate` lays out a shot plan.

Builders: the synthetic corpus (:func:`pipelines.train.conditioning.build_corpus`)
renders its sources' shots into one file; :func:`sequences_from_footage` cuts them
from curated real footage (consecutive shots of one source as curation detected
them, each with a kept, captioned clip; transitions as detected).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save as save_safetensors

from core import storage
from model.configs import ModelConfig
from model.dit import ShotLayout, TextConditioning
from model.multishot import TRANSITIONS, TextSegment, latent_shots, plan_segments
from pipelines.train.batches import DiTBatch, pad_text
from pipelines.train.data import TrainDataError, clips_table_uri
from pipelines.train.latents import LatentCacheError, LatentStore, write_index_entries

SCHEMA_VERSION = 1
TABLE_NAME = "sequences.parquet"
MIN_SHOTS = 2

SEQUENCE_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("sequence_id", pa.string()),
        ("source_id", pa.string()),
        ("sequence_uri", pa.string()),  # one file: all shots, transitions as filmed
        ("fps", pa.float64()),  # of the file
        ("num_frames", pa.int64()),  # of the file
        ("shot_start_frames", pa.list_(pa.int64())),  # first frame of each shot; [0] == 0
        ("transitions", pa.list_(pa.string())),  # one per boundary: "cut" | "fade"
        ("shot_captions", pa.list_(pa.string())),  # one per shot
        ("subject", pa.string()),  # what stays the same across the shots ("" if none)
        ("has_audio", pa.bool_()),
        ("split", pa.string()),
    ]
)


class SequenceError(TrainDataError):
    """A multi-shot sequence row is malformed or its table of another schema."""


def check_record(rec: dict) -> None:
    """Raise SequenceError naming the row and what is wrong with it."""
    where = f"sequence {rec.get('sequence_id')!r}"
    starts = list(rec.get("shot_start_frames") or [])
    n = int(rec.get("num_frames") or 0)
    if len(starts) < MIN_SHOTS:
        raise SequenceError(f"{where}: needs at least {MIN_SHOTS} shots, got {len(starts)}")
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise SequenceError(f"{where}: shot_start_frames must rise from 0, got {starts}")
    if starts[-1] >= n:
        raise SequenceError(f"{where}: a shot starts at frame {starts[-1]} of {n}")
    transitions = list(rec.get("transitions") or [])
    if len(transitions) != len(starts) - 1 or any(t not in TRANSITIONS for t in transitions):
        raise SequenceError(
            f"{where}: needs {len(starts) - 1} transitions from {TRANSITIONS}, got {transitions}"
        )
    if len(rec.get("shot_captions") or []) != len(starts):
        raise SequenceError(f"{where}: needs one caption per shot ({len(starts)})")
    if not float(rec.get("fps") or 0) > 0:
        raise SequenceError(f"{where}: fps must be > 0")


def table_uri(curated_uri: str) -> str:
    """``sequences.parquet`` beside the dataset's clips table."""
    clips = clips_table_uri(curated_uri)
    return storage.join(clips.rsplit("/", 1)[0], TABLE_NAME)


def write_sequences(uri: str, records: list[dict]) -> str:
    """Check and write sequence rows (schema columns, without schema_version)."""
    for rec in records:
        check_record(rec)
    rows = [{**rec, "schema_version": SCHEMA_VERSION} for rec in records]
    table = pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)
    table = table.replace_schema_metadata({"duet.schema_version": str(SCHEMA_VERSION)})
    with storage.local_output(uri) as path:
        pq.write_table(table, path)
    return uri


def read_records(uri: str) -> list[dict]:
    """The checked rows of the sequences table at ``uri`` (of this schema version)."""
    with storage.local_copy(uri) as path:
        table = pq.read_table(path)
    version = (table.schema.metadata or {}).get(b"duet.schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise SequenceError(f"{uri}: schema_version {version!r}, expected {SCHEMA_VERSION}")
    records = table.drop_columns(["schema_version"]).to_pylist()
    for rec in records:
        check_record(rec)
    return records


@dataclass(frozen=True)
class SequenceRow:
    sequence_id: str
    source_id: str
    uri: str
    bucket: int  # frames at the model's rate the sequence is trimmed to (1 + 4k)
    boundaries_s: tuple[float, ...]  # where each shot after the first starts
    transitions: tuple[str, ...]
    captions: tuple[str, ...]
    subject: str
    has_audio: bool

    def segments(self) -> list[TextSegment]:
        return plan_segments(self.subject, list(self.captions), list(self.transitions))


def load_sequences(curated_uri: str, cfg: ModelConfig, split: str = "train") -> list[SequenceRow]:
    """Rows of a split, trimmed to 1 + 4k frames at the model's rate (shots that
    would start past the end are left out); [] when the dataset has no table."""
    uri = table_uri(curated_uri)
    if not storage.exists(uri):
        return []
    tf = cfg.video_vae.temporal_factor
    rows = []
    for rec in read_records(uri):
        if split and rec.get("split", split) != split:
            continue
        fps = float(rec["fps"])
        n = int(np.floor(rec["num_frames"] / fps * cfg.fps + 1e-6))
        if n < 1 + tf:
            continue
        bucket = 1 + tf * ((n - 1) // tf)
        starts = [s / fps for s in rec["shot_start_frames"]]
        shots = sum(1 for s in starts if s * cfg.fps < bucket - 1)
        if shots < MIN_SHOTS:
            continue
        rows.append(
            SequenceRow(
                sequence_id=rec["sequence_id"],
                source_id=rec["source_id"],
                uri=rec["sequence_uri"],
                bucket=bucket,
                boundaries_s=tuple(starts[1:shots]),
                transitions=tuple(rec["transitions"][: shots - 1]),
                captions=tuple(rec["shot_captions"][:shots]),
                subject=rec.get("subject") or "",
                has_audio=bool(rec.get("has_audio", True)),
            )
        )
    return sorted(rows, key=lambda r: r.sequence_id)


# ---------------------------------------------------------------------------------
# Latents: the whole sequence through the VAEs once.


@torch.no_grad()
def encode_sequence_rows(pipeline, rows: list[SequenceRow]) -> dict[str, torch.Tensor]:
    """Tensors of one shard: ``<id>.video``, ``.audio`` (one encode of the whole
    file), ``.text``, ``.text_shot``, ``.boundaries_s``, ``.captioned``, ``.has_audio``."""
    from core.media import read_clip

    cfg = pipeline.config
    device = pipeline.device
    out = {}
    for row in rows:
        clip = read_clip(row.uri, require_audio=False)
        video, audio = pipeline.clip_to_tensors(clip, num_frames=row.bucket)
        text, text_shot = pipeline.text_encoder.embed_segments(row.segments(), cfg.text.max_tokens)
        key = row.sequence_id
        out[f"{key}.video"] = pipeline.video_vae.encode(video[None].to(device))[0].cpu().float()
        out[f"{key}.audio"] = pipeline.audio_vae.encode(audio[None].to(device))[0].cpu().float()
        out[f"{key}.text"] = text.float().clone()
        out[f"{key}.text_shot"] = text_shot.clone()
        out[f"{key}.boundaries_s"] = torch.tensor(row.boundaries_s, dtype=torch.float64)
        out[f"{key}.captioned"] = torch.tensor([int(any(c.strip() for c in row.captions))])
        out[f"{key}.has_audio"] = torch.tensor([int(row.has_audio)])
    return out


def sequence_cache_uri(clip_cache_uri: str, rows: list[SequenceRow]) -> str:
    """Beside the clips' cache (same VAE/text key), keyed also by the sequence rows."""
    digest = hashlib.sha256(json.dumps([r.__dict__ for r in rows], default=list).encode())
    return f"{clip_cache_uri}-sequences-{digest.hexdigest()[:12]}"


def encode_sequences(
    pipeline,
    rows: list[SequenceRow],
    cache_uri: str,
    shard_size: int,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
) -> str:
    """Encode the shards this rank owns; rank 0 writes the index (written last)."""
    index = storage.join(cache_uri, "index.json")
    if storage.exists(index):
        return cache_uri
    shards = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
    for i, shard in enumerate(shards):
        uri = storage.join(cache_uri, f"shard-{i:05d}.safetensors")
        if i % world_size == rank and not storage.exists(uri):
            storage.write_bytes(uri, save_safetensors(encode_sequence_rows(pipeline, shard)))
    if barrier is not None:
        barrier()
    if rank == 0:
        write_index_entries(
            cache_uri,
            {
                r.sequence_id: {"shard": f"shard-{i:05d}.safetensors", "bucket": r.bucket}
                for i, shard in enumerate(shards)
                for r in shard
            },
        )
    if barrier is not None:
        barrier()
    return cache_uri


@dataclass
class SequenceSample:
    video: torch.Tensor  # (Cv, T', h, w) normalised
    audio: torch.Tensor  # (Ca, Na) normalised
    text: torch.Tensor  # (L, D)
    text_shot: torch.Tensor  # (L,) long, -1 = every shot
    boundaries_s: list[float]
    captioned: bool
    has_audio: bool


class SequenceStore(LatentStore):
    """The sequence cache read back (same shard and index files as the clips')."""

    def sequence(self, sequence_id: str) -> SequenceSample:
        entry = self.clips.get(sequence_id)
        if entry is None:
            raise LatentCacheError(f"sequence {sequence_id} is not in the cache {self.uri}")
        shard = self._shard(str(entry["shard"]))
        return SequenceSample(
            video=shard[f"{sequence_id}.video"],
            audio=shard[f"{sequence_id}.audio"],
            text=shard[f"{sequence_id}.text"],
            text_shot=shard[f"{sequence_id}.text_shot"].long(),
            boundaries_s=shard[f"{sequence_id}.boundaries_s"].tolist(),
            captioned=bool(int(shard[f"{sequence_id}.captioned"][0])),
            has_audio=bool(int(shard[f"{sequence_id}.has_audio"][0])),
        )


# ---------------------------------------------------------------------------------
# Batches.


class SequenceBatches:
    """Multi-shot DiT batches: sequences of one frame bucket, each sample with its
    own shot of every latent step (its cuts fall where its footage has them)."""

    def __init__(self, rows: list[SequenceRow], store: SequenceStore | None, cfg: ModelConfig):
        self.rows = [r for r in rows if store is not None and r.sequence_id in store]
        self.store = store
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.rows)

    def build(self, size: int, gen: torch.Generator) -> DiTBatch:
        if not self.rows:
            raise TrainDataError("no multi-shot sequences to build a batch from")
        # A random sequence picks the bucket (buckets weighted by their sequences).
        first = self.rows[int(torch.randint(0, len(self.rows), (1,), generator=gen))]
        pool = [r for r in self.rows if r.bucket == first.bucket]
        picks = torch.randint(0, len(pool), (size,), generator=gen).tolist()
        rows = [pool[i] for i in picks]
        samples = [self.store.sequence(r.sequence_id) for r in rows]
        t_lat = min(s.video.shape[1] for s in samples)
        n_a = t_lat * self.cfg.audio_latents_per_video_latent
        layouts = [latent_shots(s.boundaries_s, t_lat, self.cfg) for s in samples]
        tokens, mask, shot_ids = pad_text(
            [s.text for s in samples], [s.text_shot for s in samples], self.cfg.text.max_tokens
        )
        return DiTBatch(
            video=torch.stack([s.video[:, :t_lat] for s in samples]),
            audio=torch.stack([s.audio[:, :n_a] for s in samples]),
            text=TextConditioning(tokens, mask, shot_ids),
            text_missing=torch.tensor([not s.captioned for s in samples]),
            has_audio=torch.tensor([s.has_audio for s in samples]),
            shots=ShotLayout(
                torch.stack([x.video_latent_shot for x in layouts]),  # (B, T')
                torch.stack([x.audio_latent_shot for x in layouts]),  # (B, Na)
            ),
            clip_ids=tuple(r.sequence_id for r in rows),
        )


# ---------------------------------------------------------------------------------
# Real footage: consecutive detected shots of one source, cut as one file.


def sequences_from_footage(
    curated_uri: str,
    out_uri: str,
    max_shots: int = 4,
    max_duration_s: float = 12.0,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Cut multi-shot sequences from curated footage into files under ``out_uri``;
    the table goes beside the dataset's clips table (where training looks for it).
    Returns the table's URI. ``progress(done, total)`` is called as files are written.

    A run is a stretch of a source's detected shots (``shots`` table) joined by cuts
    or fades whose every shot has a kept, captioned clip; runs are split into
    sequences of ``MIN_SHOTS..max_shots`` shots and at most ``max_duration_s``. Each
    is read from the source from its first shot's start to its last shot's end
    (trimmed boundary frames and fade tails included: they are what a cut or fade
    looks like) and written as one file; the subject caption is left empty
    (curation does not caption sources).
    """
    from core.manifest_layout import manifest_table_uri
    from core.media import read_clip, write_mp4

    if max_shots < MIN_SHOTS:
        raise SequenceError(f"max_shots must be >= {MIN_SHOTS}, got {max_shots}")
    if not max_duration_s > 0:
        raise SequenceError(f"max_duration_s must be > 0, got {max_duration_s}")
    # The table stores each file's URI: a relative one would name another place in a
    # Ray worker or on another host.
    out_uri = storage.absolute_uri(out_uri)
    clips = _read(clips_table_uri(curated_uri))
    shots = _read(manifest_table_uri(curated_uri, "shots"))
    caption = {}
    for c in clips:
        if c["keep"] and (c.get("caption") or "").strip():
            caption.setdefault((c["source_id"], c["shot_index"]), (c, c["caption"].strip()))
    by_source: dict[str, list[dict]] = {}
    for s in shots:
        by_source.setdefault(s["source_id"], []).append(s)
    runs = []
    for source_id, items in sorted(by_source.items()):
        items.sort(key=lambda s: s["index"])
        runs += [
            (source_id, r) for r in _runs(items, caption, source_id, max_shots, max_duration_s)
        ]
    records = []
    for done, (source_id, run) in enumerate(runs, 1):
        first_clip = caption[(source_id, run[0]["index"])][0]
        start, end = run[0]["start_s"], run[-1]["end_s"]
        clip = read_clip(first_clip["source_uri"], start, end, require_audio=False)
        seq_id = f"{source_id}-seq{run[0]['index']:04d}"
        uri = storage.join(out_uri, "sequences", f"{seq_id}.mp4")
        write_mp4(uri, clip)
        records.append(
            {
                "sequence_id": seq_id,
                "source_id": source_id,
                "sequence_uri": uri,
                "fps": clip.fps,
                "num_frames": clip.num_frames,
                "shot_start_frames": [int(round((s["start_s"] - start) * clip.fps)) for s in run],
                "transitions": [s["transition_in"] for s in run[1:]],
                "shot_captions": [caption[(source_id, s["index"])][1] for s in run],
                "subject": "",
                "has_audio": bool(first_clip.get("has_audio", True)),
                "split": first_clip.get("split") or "train",
            }
        )
        if progress is not None:
            progress(done, len(runs))
    return write_sequences(table_uri(curated_uri), records)


def needs_sequences(curated_uri: str) -> bool:
    """True when curation detected shots (a ``shots`` table) and no sequences table
    sits beside the clips table yet: :func:`sequences_from_footage` has work to do."""
    from core.manifest_layout import manifest_table_uri

    if not curated_uri or curated_uri.endswith(".parquet"):
        return False  # a bare clips table (a corpus, a carry) has no shots table
    shots = manifest_table_uri(curated_uri, "shots")
    return storage.exists(shots) and not storage.exists(table_uri(curated_uri))


def _runs(items, caption, source_id, max_shots, max_duration_s):
    """Consecutive captioned shots joined by a cut or fade, cut into sequences."""
    run: list[dict] = []
    for s in items + [None]:
        joins = (
            s is not None
            and run
            and s["transition_in"] in TRANSITIONS
            and (source_id, s["index"]) in caption
            and s["index"] == run[-1]["index"] + 1
            and len(run) < max_shots
            and s["end_s"] - run[0]["start_s"] <= max_duration_s
        )
        if joins:
            run.append(s)
            continue
        if len(run) >= MIN_SHOTS:
            yield run
        run = [s] if s is not None and (source_id, s["index"]) in caption else []


def _read(uri: str) -> list[dict]:
    if not storage.exists(uri):
        raise TrainDataError(f"no table at {uri}: run `duet curate` first")
    with storage.local_copy(uri) as path:
        return pq.read_table(path).to_pylist()


def sequence_batches(
    pipeline,
    curated_uri: str,
    split: str,
    clip_cache_uri: str,
    shard_size: int,
    rt=None,
    enabled: bool = True,
) -> SequenceBatches:
    """The dataset's multi-shot sequences, encoded once (each rank its shards), as
    batches; empty (no multi-shot steps) when the dataset has no sequences table or
    multi-shot steps are off (``enabled`` False: nothing is read or encoded)."""
    cfg = pipeline.config
    if not enabled:
        return SequenceBatches([], None, cfg)
    rows = load_sequences(curated_uri, cfg, split)
    if not rows:
        logging.getLogger(__name__).warning(
            "%s: no multi-shot sequences (%s); no multi-shot steps", curated_uri, TABLE_NAME
        )
        return SequenceBatches([], None, cfg)
    uri = sequence_cache_uri(clip_cache_uri, rows)
    pipeline.eval()
    if rt is None:
        encode_sequences(pipeline, rows, uri, shard_size)
    else:
        encode_sequences(pipeline, rows, uri, shard_size, rt.rank, rt.world_size, rt.barrier)
    return SequenceBatches(rows, SequenceStore(uri), cfg)
