"""The shipped checkpoint's GPU job (pipelines.shipped.gpu_job) on a host without PyAV."""

from __future__ import annotations

import os
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


# PyAV hidden: "av" resolves only from a folder named _site on sys.path (where the
# carry unpacks its xz-packed wheel), so the installed PyAV cannot answer for it.
XZ_PROGRAM = """
import importlib.machinery, sys

class OnlyFromCarry:
    def find_spec(self, name, path=None, target=None):
        if name != "av" and not name.startswith("av."):
            return None
        sites = [p for p in sys.path if p.endswith("_site")]
        if not sites:
            raise ImportError("no PyAV on this host")
        return importlib.machinery.PathFinder.find_spec(name, path or sites)

sys.meta_path.insert(0, OnlyFromCarry())
from pipelines.shipped import carry
carry.install_pyav(sys.argv[1])
import av
print(av.MARK, av.codecs.NAME)
"""


def _fake_wheel(path: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("av/__init__.py", "from . import codecs\nMARK = 'carried'\n")
        z.writestr("av/codecs.py", "NAME = 'h264' * 1000\n")
        z.writestr("av-0.dist-info/METADATA", "Name: av\nVersion: 0\n")
    return path


def test_an_xz_packed_wheel_installs_pyav_on_a_host_without_it(tmp_path):
    from pipelines.shipped import carry

    out = tmp_path / "carry"
    out.mkdir()
    packed = carry._pack_wheel_xz(str(_fake_wheel(tmp_path / "av-0-cp311-abi3-any.whl")), str(out))
    assert Path(packed).name == "av-0-cp311-abi3-any.tar.xz"
    assert not list(out.glob("*.whl"))
    done = subprocess.run(
        [sys.executable, "-c", XZ_PROGRAM, str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["carried", "h264" * 1000]
    # Without the carried archive the same host has no PyAV, and says so.
    Path(packed).unlink()
    done = subprocess.run(
        [sys.executable, "-c", XZ_PROGRAM, str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "no PyAV wheel and no PyAV installed" in done.stderr


def test_a_carry_unpacked_twice_keeps_the_first_unpacking_in_place(tmp_path):
    from pipelines.shipped import carry

    packed = carry._pack_wheel_xz(str(_fake_wheel(tmp_path / "av-0-cp311-abi3-any.whl")),
                                  str(tmp_path))  # fmt: skip
    site = tmp_path / "_site"
    carry.extract_once(packed, str(site))
    assert (site / "av" / "codecs.py").read_text() == "NAME = 'h264' * 1000\n"
    # Stands for the library a job has loaded: the second unpacking must not touch it.
    (site / "av" / "codecs.py").write_text("LOADED = True\n")
    (tmp_path / "_site.tmp-99999").mkdir()  # a job that died mid-unpack leaves this
    carry.extract_once(packed, str(site))
    assert (site / "av" / "codecs.py").read_text() == "LOADED = True\n"
    assert not list(tmp_path.glob(f"_site.tmp-{os.getpid()}"))


def test_an_xz_wheel_with_an_entry_outside_its_folder_is_refused(tmp_path):
    import io
    import tarfile

    import pytest

    from pipelines.shipped import carry

    archive = tmp_path / "av-0.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for name in ("av/__init__.py", "../escaped.py"):
            entry = tarfile.TarInfo(name)
            entry.size = 3
            tar.addfile(entry, io.BytesIO(b"x=1"))
    with pytest.raises(carry.CarryError, match="refusing entry '../escaped.py'"):
        carry.extract_wheel_xz(str(archive), str(tmp_path / "site"))
    assert not (tmp_path / "escaped.py").exists()
    assert not (tmp_path / "site" / "av").exists()


def test_decoders_tuned_alone_are_shipped_with_the_parents_dit_and_metadata(tmp_path):
    """``--decoders-only`` exports the parent checkpoint with the tuned decoders and
    vocoder; a tuned checkpoint whose encoder moved is refused (its latents are not the
    ones the parent's DiT learned)."""
    import pytest
    import torch

    from model.checkpoint import load_state
    from model.pipeline import DuetPipeline
    from pipelines.shipped.gpu_job import export_decoders

    parent = DuetPipeline.from_preset("tiny", seed=0)
    parent.save(str(tmp_path / "parent"), extra={"stage": "sft", "caption_vocabulary": ["red"]})
    tuned = DuetPipeline.from_checkpoint(str(tmp_path / "parent"))
    with torch.no_grad():
        for module in (tuned.video_vae.decoder, tuned.audio_vae.decoder, tuned.vocoder):
            next(module.parameters()).add_(1.0)
        next(tuned.dit.parameters()).add_(1.0)  # the tuned run's DiT is not shipped
    tuned.use_neural_vocoder = True
    tuned.save(str(tmp_path / "tuned"), extra={"stage": "vae"})
    out = str(tmp_path / "ship")
    export_decoders(str(tmp_path / "parent"), str(tmp_path / "tuned"), out, {"steps": 3})

    shipped, meta = load_state(out)
    before, _ = load_state(str(tmp_path / "parent"))
    after, _ = load_state(str(tmp_path / "tuned"))
    for key, value in shipped.items():
        from_tuned = key.startswith(("video_vae.decoder.", "audio_vae.decoder.", "vocoder."))
        want = (after if from_tuned else before)[key].to(torch.bfloat16)
        assert torch.equal(value, want), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vocoder."))
    assert meta["extra"]["stage"] == "sft" and meta["extra"]["caption_vocabulary"] == ["red"]
    assert meta["extra"]["decoders"] == {"steps": 3} and meta["use_neural_vocoder"]

    with torch.no_grad():
        next(tuned.video_vae.encoder.parameters()).add_(1.0)
    tuned.save(str(tmp_path / "moved"))
    with pytest.raises(ValueError, match="video_vae.encoder.*not a decoders-only run"):
        export_decoders(str(tmp_path / "parent"), str(tmp_path / "moved"), out, {})


def test_settings_that_cannot_run_are_refused_before_any_work(capsys):
    import pytest

    from pipelines.shipped.gpu_job import parse_args

    base = ["--carry", "c", "--out", "o"]
    for extra, said in (
        (["--calib-steps", "2"], "--calib-steps must be at least 3"),
        (["--decoders-only"], "give --init-from"),
    ):
        with pytest.raises(SystemExit) as err:
            parse_args(base + extra)
        assert err.value.code == 2 and said in capsys.readouterr().err
    assert parse_args(base + ["--decoders-only", "--init-from", "ck"]).vae_only


def test_a_stage_past_its_deadline_is_finished_after_the_stopped_run_is_freed(
    tmp_path, monkeypatch, capsys
):
    # The finishing run (from the newest checkpoint) must not start while the stopped
    # run's frames are alive: on a GPU they hold its networks and batch.
    import gc
    import weakref
    from types import SimpleNamespace

    from pipelines.shipped.gpu_job import TimedStages
    from pipelines.train import loop
    from pipelines.train import state as ckpt

    class Networks:  # stands for what a stopped run holds
        pass

    alive: list = []
    calls: list = []

    def run_stage(cfg, stage, rt, progress):
        calls.append(cfg.rlhf.steps)
        if len(calls) == 1:
            held = Networks()
            alive.append(weakref.ref(held))
            progress(stage, 40, 400, {"loss": 1.0})  # past the stop time: raises
        gc.collect()
        alive.append(alive[0]() is not None)
        return SimpleNamespace(steps=cfg.rlhf.steps)

    monkeypatch.setattr(loop, "run_stage", run_stage)
    monkeypatch.setattr(loop, "stage_done", lambda cfg, stage: False)
    monkeypatch.setattr(loop, "stage_uri", lambda cfg, stage: str(tmp_path / stage))
    monkeypatch.setattr(loop, "final_uri", lambda cfg, stage: str(tmp_path / "final"))
    monkeypatch.setattr(ckpt, "latest_checkpoint", lambda uri: uri + "/checkpoint_20")
    monkeypatch.setattr(ckpt, "read_train_state", lambda uri: SimpleNamespace(step=20))
    cfg = SimpleNamespace(rlhf=SimpleNamespace(steps=400))
    timed = TimedStages(rt=None, t0=0.0, out_dir=str(tmp_path), stages={})
    assert timed.run(cfg, "rlhf", stop=0.0) == 21
    assert calls == [400, 21]  # finished from the checkpoint for one step
    assert alive[1] is False  # the stopped run's objects were gone when it began
    # Where the 400-step cosine was when the deadline stopped it, said and recorded.
    fraction = timed.stages["rlhf"]["lr_fraction_at_stop"]
    assert abs(fraction - loop.lr_at(20, 400, 1.0, 0)) < 1e-4 and fraction > 0.9
    assert "learning rate at 0.99 of its peak; steps about 20" in capsys.readouterr().out


# PyAV absent; what the alignment jobs import must load, and a carry of captions only
# (no sequences table) must unpack.
CAPTIONS_ONLY_PROGRAM = """
import importlib, sys
sys.modules["av"] = None
for name in ("pipelines.shipped.align_job", "pipelines.align.stages", "pipelines.align.grpo",
             "pipelines.align.dmd", "pipelines.align.distill", "pipelines.align.evaluate",
             "pipelines.align.reward", "pipelines.train.loop", "pipelines.train.sequences"):
    importlib.import_module(name)
from pipelines.shipped import carry
carry._unpack_sequences(sys.argv[1], sys.argv[1])
import core.media
try:
    core.media.av.open
except ImportError:
    print("PyAV only where media is read")
"""


def test_the_alignment_jobs_load_without_pyav_for_a_carry_of_captions_only(tmp_path):
    """A captions-only carry installs no PyAV: the alignment stages, the training loop
    and the carry's unpack never touch media, so they load without it (on a GPU host
    they did not: ``core.media`` imported ``av`` at its top)."""
    done = subprocess.run(
        [sys.executable, "-c", CAPTIONS_ONLY_PROGRAM, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PyAV only where media is read" in done.stdout
