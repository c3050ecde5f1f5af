"""The whole chain on Ray Train: vae -> pretrain -> sft, 2 workers, S3, a worker killed.

The tiny model trains on the curated synthetic corpus with checkpoints on the
loopback S3 server; rank 1 is SIGKILLed during pretraining and Ray Train restarts
the group from the newest checkpoint. Then both DiT stages generate clips for the
held-out (validation split) captions and the world's probes measure how well each
clip matches its prompt. SFT, which continues pretraining on the high-quality
subset, must predict held-out clips better (rectified-flow loss on the validation
split with fixed noise) than the pretrained model it started from; probe
adherence is measured and printed (at this CPU budget both models score 0).
"""

from __future__ import annotations

import pytest

from core import storage
from model.pipeline import DuetPipeline
from pipelines.train import train
from pipelines.train.config import train_config_from
from pipelines.train.data import TrainDataError, load_clip_rows
from pipelines.train.evaluate import (
    EvalSettings,
    evaluate_adherence,
    held_out_flow_loss,
    held_out_prompts,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture
def fresh_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_chain_on_ray_with_a_kill_and_sft_improves_on_pretrain(
    tiny_curated_corpus, s3_bucket, fresh_ray
):
    cfg = train_config_from(
        {
            "run_uri": f"{s3_bucket}/e2e",
            "seed": 0,
            "data": {"curated_uri": tiny_curated_corpus, "sft_top_fraction": 0.6},
            "vae": {"steps": 120, "batch_size": 4, "checkpoint_every": 60, "log_every": 20,
                    "crop_px": 32},
            "pretrain": {"steps": 80, "batch_size": 4, "checkpoint_every": 40, "log_every": 10},
            "sft": {"steps": 120, "batch_size": 4, "checkpoint_every": 60, "log_every": 20,
                    "lr": 5e-4, "warmup_steps": 0},
            "debug_kill_at_step": 50,
            "debug_kill_rank": 1,
            "debug_kill_stage": "pretrain",
        }
    )  # fmt: skip
    finals = train(cfg, runner="ray", num_workers=2)
    assert storage.exists(f"{cfg.run_uri}/pretrain/killed_at_50")
    for stage in ("vae", "pretrain", "sft"):
        assert storage.exists(finals[stage] + "/model.safetensors"), stage

    try:
        rows = load_clip_rows(cfg.data, 16.0, split="val")
    except TrainDataError:
        pytest.fail("the corpus has no validation clips to hold out")
    losses = {
        stage: held_out_flow_loss(DuetPipeline.from_checkpoint(finals[stage]), rows)
        for stage in ("vae", "pretrain", "sft")  # the vae final holds the untrained DiT
    }
    print("held-out flow loss", {k: round(v, 4) for k, v in losses.items()})
    assert losses["pretrain"] < 0.8 * losses["vae"], losses
    assert losses["sft"] < losses["pretrain"], losses

    # Probe adherence on held-out captions: measured and reported. At this CPU
    # budget neither model draws objects the probes detect yet (both score 0; the
    # closing note of the training issue has the numbers), so it is not asserted.
    prompts = held_out_prompts(rows)
    assert prompts, "no held-out caption names a coloured shape"
    for stage in ("pretrain", "sft"):
        result = evaluate_adherence(
            DuetPipeline.from_checkpoint(finals[stage]),
            prompts[:2],
            EvalSettings(seeds=(0,), steps=8),
        )
        assert 0.0 <= result["adherence"] <= 1.0
        print(
            stage,
            {k: round(result[k], 3) for k in ("adherence", "colour_recall", "colour_precision")},
        )
