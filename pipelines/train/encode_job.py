"""The pre-encode job on Ray Data: manifest rows in, latent shards out, in parallel.

``ray.data.read_parquet`` streams the manifest's clips table; actors that each hold
the VAEs and the text encoder (loaded once from the parent checkpoint) take batches
of ``latent_shard_clips`` rows, keep the usable clips (:func:`select_clips`: kept,
right split, long enough for a frame bucket), decode and encode them, and write one
safetensors shard per batch, named by the hash of its clip ids so a retried batch
overwrites rather than duplicates. The driver collects the (clip, shard) pairs and
writes the index last. Training workers then only read the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from core import storage
from pipelines.train.config import DataConfig
from pipelines.train.data import clips_table_uri, select_clips
from pipelines.train.latents import INDEX_NAME, encode_rows, write_index_entries


class ShardEncoder:
    """A Ray Data actor: rows of the clips table -> one written latent shard."""

    def __init__(self, checkpoint_uri: str, data: dict[str, Any], cache_uri: str):
        from core.config import config_from_dict
        from model.pipeline import DuetPipeline

        self.pipeline = DuetPipeline.from_checkpoint(checkpoint_uri)
        self.data = config_from_dict(DataConfig, data)
        self.cache_uri = cache_uri

    def __call__(self, batch):
        from safetensors.torch import save as save_safetensors

        rows = select_clips(batch, self.data, self.pipeline.config.fps)
        if not rows:
            return {"clip_id": [], "shard": [], "bucket": []}
        digest = hashlib.sha1("|".join(r.clip_id for r in rows).encode()).hexdigest()[:16]
        name = f"shard-{digest}.safetensors"
        uri = storage.join(self.cache_uri, name)
        if not storage.exists(uri):
            storage.write_bytes(uri, save_safetensors(encode_rows(self.pipeline, rows)))
        return {
            "clip_id": [r.clip_id for r in rows],
            "shard": [name] * len(rows),
            "bucket": [r.bucket for r in rows],
        }


def encode_on_ray_data(checkpoint_uri: str, data: DataConfig, cache_uri: str) -> str:
    """Fill the latent cache at ``cache_uri`` with a Ray Data job; returns its URI."""
    import pyarrow.fs
    import ray.data

    from core.config import config_to_dict

    if storage.exists(storage.join(cache_uri, INDEX_NAME)):
        return cache_uri
    table_uri = clips_table_uri(data.curated_uri)
    if storage.scheme_of(table_uri) in ("", "file"):
        path, fs = os.path.abspath(storage.strip_scheme(table_uri)), None
    else:
        fsspec_fs = storage.filesystem(table_uri)
        path = storage.strip_scheme(table_uri)
        fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fsspec_fs))
    # The CLI draws its own progress bar; Ray Data's periodic status dump would
    # bury it (stdout is not a terminal under the flow), so it stays quiet.
    ray.data.DataContext.get_current().print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    dataset = ray.data.read_parquet(path, filesystem=fs).map_batches(
        ShardEncoder,
        fn_constructor_args=(checkpoint_uri, config_to_dict(data), cache_uri),
        batch_size=data.latent_shard_clips,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=data.encode_concurrency),
    )
    clips = {}
    for row in dataset.iter_rows():
        clips[row["clip_id"]] = {"shard": row["shard"], "bucket": int(row["bucket"])}
    write_index_entries(cache_uri, clips)
    return cache_uri
