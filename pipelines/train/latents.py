"""Pre-encoded latents: decode and encode every clip once, train the DiT many times.

The cache lives at ``CACHE/<key>/`` on any URI: ``shard-NNNNN.safetensors`` files of
``latent_shard_clips`` clips each (per clip: normalised video latent, audio latent,
text-encoder tokens) and an ``index.json`` written last (its presence means the cache
is complete). ``key`` hashes the VAE weights and configs, the text encoder and the
clip geometry, so a retrained or reconfigured VAE or another bucket list never reads
stale latents.
Shards are encoded by whichever workers exist (shard i by rank i mod W).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from core import storage
from pipelines.train.data import ClipRow, decode_clip

SCHEMA_VERSION = 1
INDEX_NAME = "index.json"


class LatentCacheError(RuntimeError):
    """The latent cache is incomplete or was written for other weights."""


def cache_key(pipeline, buckets: tuple[int, ...]) -> str:
    """Hash of the VAE encoders' weights (calibration included) and the VAE configs,
    the text encoder and the clip geometry. The decoders make no latent: a VAE whose
    decoders were fine-tuned alone (``vae.decoders_only``) keeps its cache."""
    digest = hashlib.sha256()
    for name in ("video_vae", "audio_vae"):
        for key, value in sorted(getattr(pipeline, name).state_dict().items()):
            if key.startswith("decoder."):
                continue
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    cfg = pipeline.config
    geometry = {
        "size": [cfg.width, cfg.height],
        "fps": cfg.fps,
        "sample_rate": cfg.sample_rate,
        "buckets": list(buckets),
        "text": [cfg.text.model_path, cfg.text.max_tokens, cfg.text.embed_dim],
        # Not everything that shapes a latent is a weight: the mel filterbank (band,
        # FFT size) and the hop (set by the audio latent rate) are rebuilt from the
        # config, so two VAEs with equal weights can still encode differently.
        "video_vae": dataclasses.asdict(cfg.video_vae),
        "audio_vae": dataclasses.asdict(cfg.audio_vae),
        "mel_hop_length": cfg.mel_hop_length,
    }
    digest.update(json.dumps(geometry, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@dataclass
class LatentSample:
    video: torch.Tensor  # (Cv, T', h, w) normalised
    audio: torch.Tensor  # (Ca, Na) normalised
    text: torch.Tensor  # (L, D) text-encoder tokens (L may be 0: no caption)
    has_audio: bool


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@torch.no_grad()
def encode_rows(pipeline, rows: list[ClipRow]) -> dict[str, torch.Tensor]:
    """Tensors of one shard: ``<clip_id>.video``, ``.audio``, ``.text``, ``.has_audio``."""
    tensors = {}
    device = pipeline.device
    for row in rows:
        video, audio = decode_clip(row, pipeline)
        zv = pipeline.video_vae.encode(video[None].to(device))[0]
        za = pipeline.audio_vae.encode(audio[None].to(device))[0]
        if row.text:
            text = pipeline.text_encoder.embed_tokens(row.text)
        else:
            text = torch.zeros(0, pipeline.config.text.embed_dim)
        tensors[f"{row.clip_id}.video"] = zv.cpu().float()
        tensors[f"{row.clip_id}.audio"] = za.cpu().float()
        tensors[f"{row.clip_id}.text"] = text.cpu().float().clone()  # the encoder caches by text
        tensors[f"{row.clip_id}.has_audio"] = torch.tensor([int(row.has_audio)])
    return tensors


def shard_rows(rows: list[ClipRow], shard_clips: int) -> list[list[ClipRow]]:
    return [rows[i : i + shard_clips] for i in range(0, len(rows), shard_clips)]


def encode_cache(
    pipeline,
    rows: list[ClipRow],
    cache_uri: str,
    shard_clips: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Encode the shards this rank owns; rank 0 writes the index after a barrier."""
    if storage.exists(storage.join(cache_uri, INDEX_NAME)):
        return cache_uri
    shards = shard_rows(rows, shard_clips)
    for i, shard in enumerate(shards):
        if i % world_size != rank:
            continue
        uri = storage.join(cache_uri, _shard_name(i))
        if not storage.exists(uri):  # a resumed encode keeps finished shards
            storage.write_bytes(uri, save_safetensors(encode_rows(pipeline, shard)))
        if progress is not None:
            progress(i + 1, len(shards))
    if barrier is not None:
        barrier()
    if rank == 0:
        write_index(cache_uri, shards)
    if barrier is not None:
        barrier()
    return cache_uri


def write_index(cache_uri: str, shards: list[list[ClipRow]]) -> None:
    clips = {
        row.clip_id: {"shard": _shard_name(i), "bucket": row.bucket}
        for i, shard in enumerate(shards)
        for row in shard
    }
    write_index_entries(cache_uri, clips)


def write_index_entries(cache_uri: str, clips: dict[str, dict]) -> None:
    """The index, written last: clip id -> {shard file name, bucket}."""
    for name in sorted({entry["shard"] for entry in clips.values()}):
        if not storage.exists(storage.join(cache_uri, name)):
            raise LatentCacheError(f"{cache_uri}: shard {name} missing after encoding")
    storage.write_json(
        storage.join(cache_uri, INDEX_NAME), {"schema_version": SCHEMA_VERSION, "clips": clips}
    )


class LatentStore:
    """Read side of the cache: samples by clip id, a few shards held in memory."""

    def __init__(self, cache_uri: str, max_shards_in_memory: int = 8):
        index_uri = storage.join(cache_uri, INDEX_NAME)
        if not storage.exists(index_uri):
            raise LatentCacheError(f"{cache_uri}: no {INDEX_NAME}; the cache is incomplete")
        index = storage.read_json(index_uri)
        if index.get("schema_version") != SCHEMA_VERSION:
            raise LatentCacheError(
                f"{index_uri}: schema_version {index.get('schema_version')!r}, "
                f"expected {SCHEMA_VERSION}"
            )
        self.uri = cache_uri
        self.clips: dict[str, dict] = index["clips"]
        self._shards: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._max = max_shards_in_memory

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self.clips

    def _shard(self, name: str) -> dict[str, torch.Tensor]:
        if name in self._shards:
            self._shards.move_to_end(name)
            return self._shards[name]
        data = load_safetensors(storage.read_bytes(storage.join(self.uri, name)))
        self._shards[name] = data
        while len(self._shards) > self._max:
            self._shards.popitem(last=False)
        return data

    def get(self, clip_id: str) -> LatentSample:
        entry = self.clips.get(clip_id)
        if entry is None:
            raise LatentCacheError(f"clip {clip_id} is not in the latent cache {self.uri}")
        shard = self._shard(str(entry["shard"]))
        return LatentSample(
            video=shard[f"{clip_id}.video"],
            audio=shard[f"{clip_id}.audio"],
            text=shard[f"{clip_id}.text"],
            has_audio=bool(int(shard[f"{clip_id}.has_audio"][0])),
        )
