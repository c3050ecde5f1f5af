"""Shared fixtures: a real S3 API server on loopback (moto's server mode)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Flows in tests log to the console only: shipping logs to Prefect's temporary API
# server races its shutdown at the end of the session.
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
# Set before any test module imports prefect, which reads settings at import.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


# `make test` runs two pytest-xdist workers. Each worker builds its own session and
# module fixtures, so the scheduler below hands out whole modules, and modules that
# share an expensive session fixture as one unit; the longest units are queued first
# so that both workers end together (seconds measured with two workers on the 2-core
# VM, BENCHMARKS.md "Test suite time").
_SHARED_SESSION_FIXTURE = {
    "test_train_conditioning.py": "tiny_conditioning_run",
    "test_align.py": "tiny_conditioning_run",
    "test_train_e2e.py": "tiny_curated_corpus",
    "test_train_pipeline.py": "tiny_curated_corpus",
    "test_flow_train.py": "tiny_curated_corpus",
}
_LONGEST_UNITS_FIRST = (
    "tiny_conditioning_run",  # ~1000 s: the conditioning run, then alignment
    "test_model_overfit.py",  # ~820 s
    "tiny_curated_corpus",  # ~600 s: curation, then the Ray Train chain
    "test_stack_e2e.py",  # ~350 s
)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # Two workers on two cores: one compute thread each (torch reads this at import);
    # and a Prefect home per worker, as two temporary API servers on one SQLite
    # database lock each other out.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"duet-prefect-{XDIST_WORKER}-")


def _work_unit(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return _SHARED_SESSION_FIXTURE.get(module, module)


def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(_LONGEST_UNITS_FIRST)}
    # Stable sort: the long units first, everything else in collection order.
    items.sort(key=lambda item: rank.get(_work_unit(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """xdist's module-scope scheduling over :func:`_work_unit` (xdist's own
    ``xdist_group`` marks do not reach its scheduler under pytest 9: it rewrites a
    node id attribute pytest no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return SharedFixtureScheduling(config, log)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3 server on 127.0.0.1 and point ``s3://`` URIs at it.

    Yields the endpoint URL. The server speaks the real S3 wire protocol, so s3fs,
    boto3 and Ray workers (which inherit the environment) talk to it unpatched.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the loopback server; yields ``s3://NAME``."""
    import boto3

    name = f"duet-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_temporary_server():
    """Stop Prefect's temporary API server while pytest's output is still open.

    Left to its own atexit hook, it logs "Stopping temporary server" after pytest
    has printed its summary and closed stdout, which adds a logging traceback.
    """
    yield
    import sys

    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return
    for server in list(server_module.SubprocessASGIServer._instances.values()):
        server.stop()


@pytest.fixture(scope="session")
def tiny_curated_corpus(tmp_path_factory) -> str:
    """A small synthetic corpus (128x128 at 16 fps and 16 kHz, the curation minimum size) curated by the flow.

    Shared by the training tests: bouncing and colliding shapes in 2-4 shots per
    video, cut into clips by the real curation flow (speech off). Returns its URI.
    """
    from core.synth import SynthConfig, generate_corpus
    from flows.curate import curate

    root = tmp_path_factory.mktemp("tiny_corpus")
    synth = SynthConfig(
        width=128, height=128, fps=16, sample_rate=16000,
        kinds=("bouncing_balls", "collision"), min_shots=2, max_shots=4,
        min_shot_s=2.5, max_shot_s=4.0,
    )  # fmt: skip
    generate_corpus(str(root / "raw"), 8, seed=11, config=synth)
    curated = str(root / "curated")
    curate(str(root / "raw" / "*.mp4"), curated, speech=False)
    _hold_out_last_sources(curated, 2)
    return curated


def _hold_out_last_sources(curated_uri: str, count: int) -> None:
    """Make the validation split the clips of the last ``count`` sources by file name.

    Curation splits by a hash of each source's URI, which here contains pytest's
    temporary path, so which sources land in ``val`` (if any) would change from run
    to run; training tests need a fixed, non-empty held-out set.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.manifest_layout import manifest_table_uri

    uri = manifest_table_uri(curated_uri, "clips")
    table = pq.read_table(uri)
    sources = sorted(set(table.column("source_uri").to_pylist()))
    held_out = set(sources[-count:])
    split = ["val" if u in held_out else "train" for u in table.column("source_uri").to_pylist()]
    index = table.schema.get_field_index("split")
    table = table.set_column(index, table.schema.field(index), pa.array(split, pa.string()))
    pq.write_table(table, uri)


@pytest.fixture(scope="session")
def tiny_vae_run(tiny_curated_corpus, tmp_path_factory) -> tuple[str, str]:
    """The ``vae`` stage trained once (6 steps) on the tiny corpus: (corpus, final URI).

    The config matches ``tests/test_train_pipeline.py``'s base config, whose VAE
    checks read this run's logs and checkpoints.
    """
    from pipelines.train import train
    from pipelines.train.config import train_config_from

    run = str(tmp_path_factory.mktemp("train") / "base")
    cfg = train_config_from(
        {
            "run_uri": run,
            "seed": 3,
            "data": {"curated_uri": tiny_curated_corpus, "latent_cache_uri": run + "-latents"},
            "vae": {"steps": 6, "batch_size": 2, "checkpoint_every": 3, "log_every": 1},
        }
    )
    finals = train(cfg, stages=("vae",), runner="local")
    return tiny_curated_corpus, finals["vae"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised ``tiny`` pipeline saved as a checkpoint (serving tests:
    what is served matters, not what it generates). Returns its URI."""
    from model.pipeline import DuetPipeline

    uri = str(tmp_path_factory.mktemp("tiny_checkpoint") / "ckpt")
    DuetPipeline.from_preset("tiny", seed=0).save(uri)
    return uri


def _conditioning_recipe(manifest: str, run_uri: str):
    """The CPU recipe of tests/test_train_conditioning.py (also the base of tests/test_align.py)."""
    from pipelines.train.conditioning import CorpusSpec
    from pipelines.train.config import (
        DataConfig,
        DiTStageConfig,
        ReferenceSampling,
        TrainConfig,
        VAEStageConfig,
    )

    return TrainConfig(
        preset="tiny",
        run_uri=run_uri,
        seed=0,
        data=DataConfig(curated_uri=manifest, frame_buckets=(CorpusSpec().frames_per_shot,)),
        vae=VAEStageConfig(
            steps=1200, batch_size=8, window_frames=9, crop_px=32, crop_candidates=8,
            checkpoint_every=10**6, log_every=100, eval_clips=1,
        ),
        pretrain=DiTStageConfig(
            steps=1200, batch_size=8, lr=3e-3, warmup_steps=20, ema_decay=0.99,
            checkpoint_every=10**6, log_every=100,
            references=ReferenceSampling(
                reference_probability=0.8, max_images=2, max_videos=0, max_audios=0,
                own_frame_probability=1.0, multishot_probability=0.3,
            ),
        ),
        keep_checkpoints=1,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_conditioning_run(tmp_path_factory):
    """``tiny`` trained ``vae -> pretrain`` (local runner) on the conditioning corpus of
    :mod:`pipelines.train.conditioning` (one-colour bouncing balls, 40 clips): the
    TrainConfig, whose ``run_uri`` holds both finals.

    Trained once per session and shared: tests/test_train_conditioning.py measures its
    reference and multi-shot use, tests/test_align.py continues it with sft, rlhf and
    distill (other stage directories of the same run).
    """
    import time

    import torch

    from pipelines.train import train
    from pipelines.train.conditioning import CorpusSpec, build_corpus

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("conditioning")
    started = time.perf_counter()
    manifest = build_corpus(str(root / "corpus"), CorpusSpec(sources=10, colourless_fraction=0.5))
    built = time.perf_counter()
    cfg = _conditioning_recipe(manifest, str(root / "run"))
    train(cfg, stages=("vae", "pretrain"))
    print(f"corpus {built - started:.0f} s, training {time.perf_counter() - built:.0f} s")
    return cfg
