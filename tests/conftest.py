"""Shared fixtures: a real S3 API server on loopback (moto's server mode)."""

from __future__ import annotations

import os
import socket
import uuid
from typing import NamedTuple

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
    "test_align.py": "tiny_chain_run",
    "test_contrast_pairs.py": "tiny_chain_run",
    "test_learning_signal.py": "tiny_chain_run",
    "test_train_e2e.py": "tiny_curated_corpus",
    "test_train_pipeline.py": "tiny_curated_corpus",
    "test_flow_train.py": "tiny_curated_corpus",
}
# The stack's unit (one test) stays before the docs' though it now takes less: xdist
# tops up a worker holding two tests or fewer, so the worker given the stack is handed
# the docs' unit at once too and both start first (seconds of 2026-12-06).
_LONGEST_UNITS_FIRST = (
    "tiny_curated_corpus",  # ~300 s: curation, then the Ray Train chain with a kill
    "test_stack_e2e.py",  # ~175 s
    "test_docs.py",  # ~210 s: duet demo --quick, then the README's chain
    "tiny_chain_run",  # ~160 s: the one-minute chain, then alignment, learning signals, contrasts
)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # Two workers on two cores: one compute thread each (torch reads this at import);
    # and a Prefect home per worker, as two temporary API servers on one SQLite
    # database lock each other out.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"duet-prefect-{XDIST_WORKER}-")


def _refuse(what: str):
    def refuse(*_args, **_kwargs):
        raise RuntimeError(
            f"`make test-fast` (-m 'not slow') must not {what}: mark this test `slow`"
        )

    return refuse


def pytest_configure(config):
    """`make test-fast` promises minutes without Ray or Prefect: under ``-m "not slow"``
    starting either is an error, so a test that needs them and lacks the `slow` mark
    fails there instead of quietly making the fast suite slow."""
    if "not slow" not in (config.getoption("markexpr", "") or ""):
        return
    import ray
    from prefect.server.api import server

    ray.init = _refuse("start Ray")
    server.SubprocessASGIServer.start = _refuse("start a Prefect API server")


def _work_unit(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return _SHARED_SESSION_FIXTURE.get(module, module)


# Session fixtures that run the curation flow (a Prefect temporary server and Ray):
# every test that needs one, directly or through another fixture, is `slow`.
_FIXTURES_THAT_START_PREFECT_AND_RAY = ("tiny_curated_corpus",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(f in item.fixturenames for f in _FIXTURES_THAT_START_PREFECT_AND_RAY):
            item.add_marker(pytest.mark.slow)
    rank = {unit: i for i, unit in enumerate(_LONGEST_UNITS_FIRST)}
    # Stable sort: the long units first, everything else in collection order.
    items.sort(key=lambda item: rank.get(_work_unit(item.nodeid), len(rank)))


def _scheduler_class():
    """xdist's module-scope scheduling over :func:`_work_unit` (xdist's own
    ``xdist_group`` marks do not reach its scheduler under pytest 9: it rewrites a
    node id attribute pytest no longer reads). ``_split_scope`` is private to xdist:
    tests/test_suite_config.py fails if xdist stops calling it."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return SharedFixtureScheduling


@pytest.hookimpl(optionalhook=True)  # absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    return _scheduler_class()(config, log)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ports a test hands to a server that starts later (the stack's Ray, S3 and Prefect,
# Ray Serve's proxy) come from below Linux's ephemeral range (32768-60999) and above
# Ray's worker ports (10002-19999): a port taken from the ephemeral range and let go
# was given again to one of Ray's own bind(0) listeners between the pick and the
# dashboard's start (CI, 2026-12-06: "address already in use" for the dashboard).
_LISTEN_PORTS = (20000, 32700)


def _listen_port(taken: set[int]) -> int:
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*_LISTEN_PORTS)
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in {_LISTEN_PORTS}")


@pytest.fixture(scope="session")
def listen_port():
    """A callable giving a free loopback port outside the ranges that Ray and the
    kernel hand out on their own; never the same port twice in a session."""
    taken: set[int] = set()
    return lambda: _listen_port(taken)


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


class VaeRun(NamedTuple):
    corpus: str  # the curated corpus it trained on
    run: str  # the run folder (its stage under run/vae)
    final: str  # the stage's final checkpoint
    latents: str  # the latent cache of the stages after it


@pytest.fixture(scope="session")
def tiny_vae_run(tiny_curated_corpus, tmp_path_factory) -> VaeRun:
    """The ``vae`` stage trained once (6 steps) on the tiny corpus. Its latent cache is
    keyed by the VAE's weights, so the later stages of every test starting from this
    VAE share it and the clips are encoded once.

    The config matches ``tests/test_train_pipeline.py``'s base config, whose VAE
    checks read this run's logs and checkpoints.
    """
    from pipelines.train import train
    from pipelines.train.config import train_config_from

    run = str(tmp_path_factory.mktemp("train") / "base")
    latents = run + "-latents"
    cfg = train_config_from(
        {
            "run_uri": run,
            "seed": 3,
            "data": {"curated_uri": tiny_curated_corpus, "latent_cache_uri": latents},
            "vae": {"steps": 6, "batch_size": 2, "checkpoint_every": 3, "log_every": 1},
        }
    )
    finals = train(cfg, stages=("vae",), runner="local")
    return VaeRun(corpus=tiny_curated_corpus, run=run, final=finals["vae"], latents=latents)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised ``tiny`` pipeline saved as a checkpoint (serving tests:
    what is served matters, not what it generates). Returns its URI."""
    from model.pipeline import DuetPipeline

    uri = str(tmp_path_factory.mktemp("tiny_checkpoint") / "ckpt")
    DuetPipeline.from_preset("tiny", seed=0).save(uri)
    return uri


def _short_chain_config(manifest: str, run_uri: str) -> dict:
    """Every stage, vae -> pretrain -> sft -> rlhf -> distill, at the fewest steps
    that exercise it (checkpoints, resume points, logs): for functional tests, not
    quality. What a CPU recipe learns is measured by ``bench/quality.py``. The VAE's
    colour permutation (on by default) is off: 40 steps are too few for it, and the
    learning-signal bars of tests/test_learning_signal.py were set on these latents
    (with it, the distill loss falls to 0.70 of its start instead of under 0.6)."""
    refs = {
        "reference_probability": 0.8,
        "max_images": 2,
        "max_videos": 0,
        "max_audios": 0,
        "own_frame_probability": 1.0,
        "multishot_probability": 0.3,
    }
    return {
        "preset": "tiny", "run_uri": run_uri, "seed": 0, "keep_checkpoints": 2,
        "data": {"curated_uri": manifest, "frame_buckets": [17]},
        "vae": {"steps": 40, "batch_size": 4, "window_frames": 9, "crop_px": 32,
                "crop_candidates": 4, "checkpoint_every": 20, "log_every": 5, "eval_clips": 1,
                "colour_permute": 0.0},
        "pretrain": {"steps": 40, "batch_size": 4, "lr": 3e-3, "warmup_steps": 5,
                     "ema_decay": 0.9, "checkpoint_every": 20, "log_every": 5,
                     "references": refs},
        "sft": {"steps": 10, "batch_size": 4, "lr": 5e-4, "warmup_steps": 0, "ema_decay": 0.0,
                "checkpoint_every": 10, "log_every": 2},
        "rlhf": {"steps": 3, "batch_size": 1, "lr": 2e-4, "group_size": 4, "sample_steps": 4,
                 "checkpoint_every": 1, "log_every": 1,
                 "preferences": {"candidates_per_prompt": 4, "rounds": 1, "steps": 4},
                 "reward": {"steps": 20, "holdout_fraction": 0.34, "min_margin": 0.01, "min_agreement": 0.0,
                            "observer_steps": 20, "observer_batch": 4, "observer_size": 64,
                            "observer_colour_steps": 20,
                            "corpus_contrasts": 8}},
        "distill": {"steps": 20, "batch_size": 8, "trajectories_per_prompt": 2,
                    "teacher_steps": 4, "checkpoint_every": 10, "log_every": 5},
    }  # fmt: skip


@pytest.fixture(scope="session")
def tiny_chain_run(tmp_path_factory):
    """``tiny`` trained through every stage at the fewest steps (about a minute), on
    the conditioning corpus of :mod:`pipelines.train.conditioning` (one-colour
    bouncing balls, written losslessly: the same frames every run). Returns the
    TrainConfig; its ``run_uri`` holds every stage's checkpoints and final."""
    import torch

    from pipelines.train import train
    from pipelines.train.conditioning import CorpusSpec, build_corpus
    from pipelines.train.config import train_config_from

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("chain")
    manifest = build_corpus(str(root / "corpus"), CorpusSpec(sources=4))
    cfg = train_config_from(_short_chain_config(manifest, str(root / "run")))
    train(cfg, stages=("vae", "pretrain", "sft", "rlhf", "distill"))
    return cfg
