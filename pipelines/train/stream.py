"""Decoded clips streamed to a training worker by Ray Data, in the sampler's order.

The VAE stage trains on pixels and audio, so its clips must be decoded on every
step (the DiT stages read pre-encoded latents instead). Under Ray Train each worker
streams its own future batches through a Ray Data pipeline: ``from_items`` (this
rank's clip indices for the rest of the stage, in :class:`EpochSampler` order) ->
``map_batches`` (read + decode + resize, in Ray tasks that may run on any node's
CPUs) -> ``iter_torch_batches`` with prefetching, so decoding overlaps the step and
GPU workers never decode.

Why not ``ray.train.get_dataset_shard``: its ``streaming_split`` hands blocks to
whichever worker asks first, and a restarted worker group reads the dataset from
its first row. Neither "every clip once per epoch across ranks" nor "resume at the
saved data position" (both required of the trainer, and tested) would hold. Here
the order is the sampler's, ``preserve_order`` keeps it through Ray Data, and a
resumed worker starts its stream at the restored position.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from core.config import config_from_dict, config_to_dict
from model.configs import ModelConfig
from pipelines.train.data import ClipRow, EpochSampler, SamplerPosition, TrainDataError


class _DecodeClips:
    """Ray Data map_batches UDF: clip URIs -> (video, audio) arrays for a model config."""

    def __init__(self, model_config: dict):
        self.config = config_from_dict(ModelConfig, model_config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from core.media import read_clip
        from model.pipeline import clip_tensors

        videos, audios = [], []
        for uri, bucket in zip(batch["clip_uri"], batch["bucket"], strict=True):
            clip = read_clip(str(uri), require_audio=False)
            video, audio = clip_tensors(clip, self.config, num_frames=int(bucket))
            videos.append(video.numpy())
            audios.append(audio.numpy())
        return {"index": batch["index"], "video": np.stack(videos), "audio": np.stack(audios)}


class DecodedClipStream:
    """This rank's decoded batches, produced ahead of use by Ray Data tasks.

    ``start(position)`` begins at a sampler position (0/0, or a checkpoint's);
    ``take(indices)`` returns the next batch's clips and checks that they are the
    ones the loop asked for (the stream and the sampler never drift silently).
    """

    def __init__(
        self,
        rows: list[ClipRow],
        sampler: EpochSampler,
        rank: int,
        model_config: ModelConfig,
        decode_cpus: float = 0.5,
        prefetch_batches: int = 2,
    ):
        self.rows = rows
        self.sampler = sampler
        self.rank = rank
        self.model_config = config_to_dict(model_config)
        self.decode_cpus = decode_cpus
        self.prefetch_batches = prefetch_batches
        self._batches: Iterator[tuple[list[int], list]] | None = None

    def start(self, position: SamplerPosition, num_batches: int) -> None:
        """Stream this rank's next ``num_batches`` batches from ``position`` on."""
        mine = []
        epoch, first = position.epoch, position.batch
        while len(mine) < num_batches:
            batches = self.sampler.epoch_batches(epoch)
            for batch in batches[first:]:
                mine.append(batch[self.rank :: self.sampler.world_size])
            epoch, first = epoch + 1, 0
        self._batches = self._run(mine[:num_batches]) if num_batches > 0 else iter(())

    def take(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._batches is None:
            raise RuntimeError("DecodedClipStream.take before start")
        got, clips = next(self._batches)
        if got != list(indices):
            raise TrainDataError(f"decode stream out of step: expected {indices}, got {got}")
        return clips

    def _run(self, mine: list[list[int]]) -> Iterator[tuple[list[int], list]]:
        # One dataset (one decode actor) for the whole rest of the stage: a dataset
        # per epoch would start an actor per epoch, and finished datasets' actors
        # can hold their CPUs long enough to starve the next one on a small cluster.
        import ray.data

        per_rank = len(mine[0])
        items = [
            {"index": i, "clip_uri": self.rows[i].clip_uri, "bucket": self.rows[i].bucket}
            for batch in mine
            for i in batch
        ]
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        dataset = ray.data.from_items(items, override_num_blocks=len(mine)).map_batches(
            _DecodeClips,
            fn_constructor_kwargs={"model_config": self.model_config},
            batch_size=per_rank,
            num_cpus=self.decode_cpus,
            concurrency=1,
        )
        for batch in dataset.iter_torch_batches(
            batch_size=per_rank, prefetch_batches=self.prefetch_batches
        ):
            indices = [int(i) for i in batch["index"]]
            yield indices, list(zip(batch["video"], batch["audio"], strict=True))
