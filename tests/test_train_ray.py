"""Ray Train: 2 workers, checkpoints on the loopback S3 server, a worker SIGKILLed mid-stage.

Reference: the same stage with the same training function launched by torchrun
(2 processes, gloo, no Ray, no kill). The Ray run loses rank 1 to SIGKILL at step
5; Ray Train restarts the worker group from the newest checkpoint (step 3, which
``ray.train.get_checkpoint()`` hands back) and finishes. Every step's loss must
equal the reference's: both runs see the same global batches (a function of seed
and epoch), the same per-rank noise (seeded by seed, stage, step, rank) and, after
the restart, the same weights, optimizer moments and EMA.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from core import storage
from core.config import config_to_dict
from pipelines.train import train
from pipelines.train.config import train_config_from
from pipelines.train.loop import final_uri

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(stage_uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(stage_uri + "/metrics.jsonl").splitlines()]


@pytest.fixture
def fresh_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_ray_train_restarts_a_killed_worker_from_s3_and_matches_torchrun(
    tiny_vae_run, s3_bucket, tmp_path, fresh_ray
):
    corpus, vae_final = tiny_vae_run
    shared = {
        "seed": 5,
        "init_from": vae_final,
        "record_samples": True,
        "data": {"curated_uri": corpus, "latent_cache_uri": str(tmp_path / "latents")},
        "pretrain": {"steps": 8, "batch_size": 2, "checkpoint_every": 3, "log_every": 1},
    }
    reference = train_config_from({**shared, "run_uri": str(tmp_path / "torchrun")})
    cfg_path = tmp_path / "reference.json"
    cfg_path.write_text(json.dumps(config_to_dict(reference)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "cli.main", "train", "pretrain", "--runner", "local", "--config", str(cfg_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    killed = train_config_from(
        {
            **shared,
            "run_uri": f"{s3_bucket}/run",
            "debug_kill_at_step": 5,
            "debug_kill_rank": 1,
            "debug_kill_stage": "pretrain",
            "keep_checkpoints": 2,
        }
    )
    finals = train(killed, stages=("pretrain",), runner="ray", num_workers=2)
    stage = f"{s3_bucket}/run/pretrain"
    assert storage.exists(stage + "/killed_at_5"), "the fault was never injected"
    assert storage.exists(finals["pretrain"] + "/model.safetensors")

    ref, got = _metrics(str(tmp_path / "torchrun" / "pretrain")), _metrics(stage)
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a, b)
    meta = storage.read_json(final_uri(killed, "pretrain") + "/config.json")["extra"]
    assert meta["world_size"] == 2 and meta["parent"] == vae_final
    # Ray's CheckpointConfig(num_to_keep=2) pruned the older ones in S3.
    fs = storage.filesystem(stage)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(storage.strip_scheme(stage), refresh=True))
    assert len([n for n in names if n.startswith("checkpoint_2")]) == 2, names  # Ray dates them
