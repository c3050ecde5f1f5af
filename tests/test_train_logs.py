"""Training logs on an object store: TensorBoard's local mirror is copied up, then removed."""

from __future__ import annotations

import os

from core import storage
from pipelines.train.logs import MetricsLog


def test_an_s3_stage_log_uploads_its_events_and_leaves_no_local_mirror(s3_bucket):
    stage = f"{s3_bucket}/run/vae"
    log = MetricsLog(stage)
    for step in (1, 2):
        log.add(step, {"loss": 1.0 / step})
    log.flush()
    mirror = log._tb_local
    assert os.listdir(mirror), "TensorBoard wrote nothing locally"
    log.add(3, {"loss": 0.25})
    log.write_report({"steps": 3})

    names = [p.rsplit("/", 1)[-1] for p in storage.filesystem(stage).ls(
        storage.strip_scheme(stage + "/tensorboard"), refresh=True)]  # fmt: skip
    assert any(n.startswith("events.out.tfevents") for n in names), names
    assert storage.exists(stage + "/report.html")
    assert not os.path.exists(mirror)


def test_a_local_stage_log_keeps_its_events_in_the_stage(tmp_path):
    stage = str(tmp_path / "vae")
    log = MetricsLog(stage)
    log.add(1, {"loss": 1.0})
    log.write_report({"steps": 1})
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(stage + "/tensorboard"))
