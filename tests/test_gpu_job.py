"""The shipped checkpoint's GPU job (pipelines.shipped.gpu_job) on a host without PyAV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# PyAV is absent (importing it fails) until the carry's unpack installs it; the fake
# unpack "installs" it and stops the job there.
PROGRAM = """
import sys
sys.modules["av"] = None
from pipelines.shipped import carry

def unpack(carry_dir, work_dir):
    del sys.modules["av"]
    raise SystemExit("unpacked before anything imported PyAV")

carry.unpack = unpack
from pipelines.shipped import gpu_job
gpu_job.main(["--carry", "unused", "--out", sys.argv[1]])
"""


def test_the_job_unpacks_the_carry_before_importing_what_needs_pyav(tmp_path):
    """A bare GPU host has no PyAV: the carry installs it, so nothing that imports
    ``av`` (the training loop does, through core.media) may load before unpacking."""
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "unpacked before anything imported PyAV" in done.stderr, done.stderr[-2000:]
