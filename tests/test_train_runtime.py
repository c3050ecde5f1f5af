"""Where a training process runs: what Ray Train's publish and restore leave on disk.

Under Ray Train each checkpoint is written to a local staging directory and handed to
``ray.train.report``, which uploads it to the run's storage before returning; a copy
kept afterwards would fill the worker's disk over a long run (one per checkpoint). The
restore side reads a local copy of the newest checkpoint once, then releases it (the
loop's side is tests/test_train_pipeline.py's). Ray's ``report`` is
replaced here by a recorder (the real upload is tests/test_train_e2e.py's).
"""

from __future__ import annotations

import os

import pytest
import ray.train

from pipelines.train.runtime import Runtime


def _staged(tmp_path):
    staged = tmp_path / "duet-ckpt-x"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"weights")
    return str(staged)


def test_a_published_checkpoint_is_uploaded_whole_then_removed(tmp_path, monkeypatch):
    seen = []

    def report(metrics, checkpoint=None):
        seen.append((metrics, sorted(os.listdir(checkpoint.path))))

    monkeypatch.setattr(ray.train, "report", report)
    staged = _staged(tmp_path)
    Runtime(under_ray=True).publish({"step": 4}, staged)
    assert seen == [({"step": 4}, ["model.safetensors"])]
    assert not os.path.exists(staged)


def test_a_failed_report_still_removes_the_staging_copy(tmp_path, monkeypatch):
    def report(metrics, checkpoint=None):
        raise RuntimeError("storage unreachable")

    monkeypatch.setattr(ray.train, "report", report)
    staged = _staged(tmp_path)
    with pytest.raises(RuntimeError, match="storage unreachable"):
        Runtime(under_ray=True).publish({"step": 4}, staged)
    assert not os.path.exists(staged)


def test_without_ray_the_checkpoint_directory_is_the_checkpoint_and_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(ray.train, "report", lambda *a, **k: pytest.fail("no Ray here"))
    staged = _staged(tmp_path)
    Runtime(under_ray=False).publish({"step": 4}, staged)
    Runtime(under_ray=False).release_restored(staged)
    assert os.listdir(staged) == ["model.safetensors"]


def test_each_rank_restores_into_a_copy_of_its_own(tmp_path, monkeypatch):
    # Ray's default local directory for a checkpoint is shared by the workers of a
    # node: one rank releasing it must not remove what another is still reading.
    stored = ray.train.Checkpoint.from_directory(_staged(tmp_path))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: stored)
    rank0, rank1 = Runtime(rank=0, under_ray=True), Runtime(rank=1, under_ray=True)
    first, second = rank0.restored_checkpoint(), rank1.restored_checkpoint()
    assert first != second
    rank0.release_restored(first)
    assert not os.path.exists(first)
    assert os.listdir(second) == ["model.safetensors"]
    assert os.listdir(stored.path) == ["model.safetensors"]  # the stored checkpoint stays
    rank1.release_restored(second)
