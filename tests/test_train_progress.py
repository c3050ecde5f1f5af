"""The driver's progress under Ray Train (pipelines.train.ray_train): a thread reads the
metrics the workers flush to storage and tells the progress bar, every 2 s and once
more when the stage has ended."""

from __future__ import annotations

import json
import threading

from core import storage
from pipelines.train.config import train_config_from
from pipelines.train.logs import METRICS_NAME
from pipelines.train.ray_train import _watch


def test_a_stage_shorter_than_the_poll_still_shows_its_last_step(tmp_path):
    """Once the controller polled every 0.5 s a quick demo's pretrain (4 steps) ended
    before the watcher's first read, and its progress showed no step at all."""
    cfg = train_config_from({"run_uri": str(tmp_path), "pretrain": {"steps": 4}})
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    storage.write_text(
        storage.join(str(tmp_path), "pretrain", METRICS_NAME),
        "".join(json.dumps(r) + "\n" for r in rows),
    )
    told = []
    ended = threading.Event()
    ended.set()  # fit() returned before the first poll
    _watch(
        cfg, "pretrain", lambda stage, step, total, row: told.append((stage, step, total)), ended
    )
    assert told == [("pretrain", 4, 4)]


def test_a_stage_without_metrics_yet_tells_nothing(tmp_path):
    cfg = train_config_from({"run_uri": str(tmp_path)})
    told = []
    ended = threading.Event()
    ended.set()
    _watch(cfg, "vae", lambda *args: told.append(args), ended)
    assert told == []
