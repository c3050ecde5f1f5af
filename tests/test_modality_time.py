"""A flow time per modality: each branch's time drives its own modulation, the
cross-modal exchange knows the other's, reference tokens are clean (time 0), older
checkpoints compute what they did, the trainer draws independent and clean-branch
times, and V2A / A2V hold the given branch fixed through sampling, from the model
API, ``duet generate`` and the job API."""

from __future__ import annotations

import json
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from model.configs import get_config
from model.dit import DualBranchDiT, TextConditioning, is_new_key
from model.references import ReferenceLatents, RefSlot

TINY = get_config("tiny")


def _inputs(cfg=TINY, seed: int = 7):
    """(video (2, 8, 3, 8, 8), audio (2, 16, 12), t (2,), text) of the tiny preset."""
    g = torch.Generator().manual_seed(seed)
    sf = cfg.video_vae.spatial_factor
    lat = (2, cfg.video_vae.latent_channels, 3, cfg.height // sf, cfg.width // sf)
    video = torch.randn(lat, generator=g)
    m = cfg.audio_latents_per_video_latent
    audio = torch.randn(2, cfg.audio_vae.latent_channels, 3 * m, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    text = TextConditioning(torch.randn(2, 5, cfg.text.embed_dim, generator=g), mask)
    return video, audio, torch.tensor([0.25, 0.8]), text


def _keyed_weights(keys_shapes: dict) -> dict[str, torch.Tensor]:
    """Weights that depend on each key's name only (not on parameter order), so the
    network before and after new parameters were added gets the same ones."""
    state = {}
    for key, shape in keys_shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        w = torch.randn(shape, generator=g) * 0.1
        norm = key.endswith("norm.weight") or ".q_norm." in key or ".k_norm." in key
        state[key] = w + 1.0 if norm or "norm_text.weight" in key else w
    return state


def _random_dit(seed: int = 0) -> DualBranchDiT:
    """A tiny DiT with every parameter (zero-initialised ones too) non-zero."""
    torch.manual_seed(seed)
    dit = DualBranchDiT(TINY).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return dit


def _record_inputs(module: torch.nn.Module, into: list):
    return module.register_forward_pre_hook(lambda _m, args: into.append(args[0].detach().clone()))


# -- the model -----------------------------------------------------------------------


def test_each_branch_time_reaches_its_own_modulation_and_the_exchange_the_others():
    dit = _random_dit()
    video, audio, t, text = _inputs()
    block = dit.blocks[1]
    assert block.cross is not None

    def run(t_v, t_a):
        seen_v, seen_a = [], []
        handles = [_record_inputs(block.video.modulation, seen_v),
                   _record_inputs(block.audio.modulation, seen_a)]  # fmt: skip
        with torch.no_grad():
            out = dit(video, audio, (t_v, t_a), text)
        for h in handles:
            h.remove()
        # Calls: the branch's own modulation, then the exchange's.
        assert len(seen_v) == len(seen_a) == 2
        return out, seen_v, seen_a

    (v0, a0), own_v0, own_a0 = run(t, t)
    (v1, a1), own_v1, own_a1 = run(t, torch.tensor([0.9, 0.1]))  # only the audio's time
    # The video branch's own AdaLN input is unchanged, the audio branch's is not.
    assert torch.equal(own_v0[0], own_v1[0])
    assert not torch.allclose(own_a0[0], own_a1[0])
    assert torch.equal(own_v0[0], F.silu(dit.time_v(t)))
    assert torch.allclose(own_a1[0], F.silu(dit.time_a(torch.tensor([0.9, 0.1]))))
    # The video side of the exchange knows the audio's time.
    assert not torch.allclose(own_v0[1], own_v1[1])
    assert not torch.allclose(v0, v1) and not torch.allclose(a0, a1)
    # With the exchange off, nothing of the video branch depends on the audio's time.
    with torch.no_grad():
        off0 = dit(video, audio, (t, t), text, cross_modal=False)[0]
        off1 = dit(video, audio, (t, torch.tensor([0.9, 0.1])), text, cross_modal=False)[0]
    assert torch.equal(off0, off1)
    # One t is both branches' time.
    with torch.no_grad():
        single = dit(video, audio, t, text)
    assert torch.equal(single[0], v0) and torch.equal(single[1], a0)


def test_clean_reference_tokens_see_time_zero():
    dit = _random_dit()
    video, audio, t, text = _inputs()
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, TINY.video_vae.latent_channels, 1, 8, 8, generator=g)
    refs = ReferenceLatents(images=[RefSlot(image)])
    block = dit.blocks[0]
    n_main = video.shape[2] * (video.shape[3] // TINY.dit.video_patch) ** 2

    def attention_input(times):
        seen = {}

        def grab(name):
            def hook(_module, args):
                seen.setdefault(name, args[0])

            return hook

        pre = block.register_forward_pre_hook(grab("x"))
        hook = block.video.attn.register_forward_pre_hook(grab("h"))
        with torch.no_grad():
            dit(video, audio, times, text, refs)
        pre.remove()
        hook.remove()
        return seen["x"], seen["h"]

    x, h = attention_input(t)
    assert x.shape[1] > n_main  # reference tokens are in the sequence

    def expected(times, tokens):
        with torch.no_grad():
            mod = block.video.modulation(F.silu(dit.time_v(times))).chunk(block.video.num_mod, -1)
            normed = F.layer_norm(tokens, (tokens.shape[-1],), eps=1e-6)
            return normed * (1 + mod[1][:, None]) + mod[0][:, None]

    # The clip's tokens are modulated by the sample's time, the references' by time 0.
    assert torch.allclose(h[:, :n_main], expected(t, x[:, :n_main]), atol=1e-5)
    assert torch.allclose(h[:, n_main:], expected(torch.zeros(2), x[:, n_main:]), atol=1e-5)
    assert not torch.allclose(h[:, n_main:], expected(t, x[:, n_main:]), atol=1e-3)
    # So the references' first-block state does not depend on the sample's time.
    _, h_other = attention_input(torch.tensor([0.9, 0.05]))
    assert torch.equal(h[:, n_main:], h_other[:, n_main:])


# Outputs of the DiT as it was before the per-branch times (model/dit.py at 41f0f23)
# for the keyed weights and inputs above: sum, sum of |x| of each branch, and two
# entries.
OLD_OUTPUTS = (-46.909081, 2280.272461, 17.594826, 246.657166, -1.112576, 0.463404)


def _summary(v, a) -> tuple[float, ...]:
    return tuple(float(x) for x in (v.sum(), v.abs().sum(), a.sum(), a.abs().sum(),
                                    v.flatten()[0], a.flatten()[-1]))  # fmt: skip


def test_an_older_checkpoint_loads_and_computes_what_it_did(tmp_path):
    from model.checkpoint import COMPONENTS, load_full_state_dict, save_state
    from model.pipeline import DuetPipeline, load_pipeline

    pipe = DuetPipeline.from_preset("tiny")
    new_keys = [k for k in pipe.dit.state_dict() if is_new_key(k)]
    assert new_keys  # the other-time projections
    old = {k: tuple(v.shape) for k, v in pipe.dit.state_dict().items() if not is_new_key(k)}
    weights = _keyed_weights(old)
    # Written as the old code wrote it: no new keys in the file.
    tensors = {f"dit.{k}": v for k, v in weights.items()}
    for name in COMPONENTS[:2] + COMPONENTS[3:]:
        tensors.update({f"{name}.{k}": v for k, v in getattr(pipe, name).state_dict().items()})
    meta = {"config": pipe.config.to_dict(), "components": list(COMPONENTS),
            "use_neural_vocoder": False, "extra": {}}  # fmt: skip
    uri = str(tmp_path / "old")
    save_state(uri, tensors, meta)

    loaded = load_pipeline(uri).dit
    for key in new_keys:
        assert torch.count_nonzero(loaded.state_dict()[key]) == 0
    video, audio, t, text = _inputs()
    with torch.no_grad():
        one = loaded(video, audio, t, text)
        pair = loaded(video, audio, (t, t.clone()), text)
    assert _summary(*one) == pytest.approx(OLD_OUTPUTS, rel=1e-4, abs=1e-5)
    assert torch.equal(one[0], pair[0]) and torch.equal(one[1], pair[1])
    # A plain load_state_dict of the old keys (training resume) fills them the same.
    fresh = DualBranchDiT(TINY).eval()
    load_full_state_dict(fresh, dict(weights))
    with torch.no_grad():
        again = fresh(video, audio, t, text)
    assert torch.equal(again[0], one[0]) and torch.equal(again[1], one[1])


# -- training ------------------------------------------------------------------------


def test_the_trainer_draws_independent_and_clean_branch_times_at_the_configured_rates():
    from pipelines.train.loop import branch_times

    flow = TINY.flow
    n = 20000
    has_audio = torch.ones(n, dtype=torch.bool)
    has_audio[: n // 4] = False
    times = branch_times(n, flow, 1.0, has_audio, torch.Generator().manual_seed(0), 0.3, 0.2)
    clean = times.clean_video | times.clean_audio
    assert not (times.clean_video & times.clean_audio).any()
    assert torch.equal(times.video[times.clean_video], torch.zeros(int(times.clean_video.sum())))
    assert torch.equal(times.audio[times.clean_audio], torch.zeros(int(times.clean_audio.sum())))
    assert not clean[~has_audio].any()  # a silent clip's audio is nothing to condition on
    with_sound = clean[has_audio].float().mean()
    assert abs(float(with_sound) - 0.2) < 0.015
    assert abs(float(times.clean_video.sum() / clean.sum()) - 0.5) < 0.04
    both_noisy = ~clean
    independent = (times.video != times.audio)[both_noisy].float().mean()
    assert abs(float(independent) - 0.3) < 0.015
    assert (times.video[both_noisy] > 0).all() and (times.audio[both_noisy] > 0).all()
    shared = branch_times(1000, flow, 1.0, torch.ones(1000, dtype=torch.bool),
                          torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(shared.video, shared.audio)
    with pytest.raises(ValueError, match="clean_branch_probability"):
        branch_times(4, flow, 1.0, torch.ones(4, dtype=torch.bool), None, 0.3, 1.5)


def test_the_clean_branch_is_given_clean_and_its_loss_masked():
    from pipelines.train.batches import DiTBatch
    from pipelines.train.config import DiTStageConfig
    from pipelines.train.loop import dit_loss

    b = 64
    g = torch.Generator().manual_seed(1)
    x0v = torch.randn(b, 8, 2, 4, 4, generator=g)
    x0a = torch.randn(b, 16, 8, generator=g)
    text = TextConditioning(torch.zeros(b, 2, 4), torch.ones(b, 2, dtype=torch.bool))
    has_audio = torch.ones(b, dtype=torch.bool)
    batch = DiTBatch(x0v, x0a, text, torch.zeros(b, dtype=torch.bool), has_audio)
    seen = {}

    def model(video, audio, t, text, refs, shots, text_drop=None):
        t_v, t_a = t
        seen.update(video=video, audio=audio, t_v=t_v, t_a=t_a)
        # A clean branch's prediction is far off: it must not reach the loss.
        pv = torch.where(t_v.view(-1, 1, 1, 1, 1) == 0, 1e6, 0.0) + torch.zeros_like(video)
        pa = torch.where(t_a.view(-1, 1, 1) == 0, 1e6, 0.0) + torch.zeros_like(audio)
        return pv, pa

    stage = DiTStageConfig(independent_time_probability=0.5, clean_branch_probability=0.5)
    loss, metrics = dit_loss(model, batch, TINY.flow, 1, torch.Generator().manual_seed(2),
                             "cpu", stage)  # fmt: skip
    clean_v, clean_a = seen["t_v"] == 0, seen["t_a"] == 0
    assert clean_v.any() and clean_a.any()
    # A clean branch goes in as its data, exactly.
    assert torch.equal(seen["video"][clean_v], x0v[clean_v])
    assert torch.equal(seen["audio"][clean_a], x0a[clean_a])
    assert metrics["clean_video"] == pytest.approx(float(clean_v.float().mean()))
    # The loss is the noisy samples' alone (the prediction 0 is off by the velocity).
    gv = torch.Generator().manual_seed(2)
    nv = torch.randn(x0v.shape, generator=gv)
    na = torch.randn(x0a.shape, generator=gv)
    want_v = ((nv - x0v) ** 2).flatten(1).mean(1)[~clean_v].mean()
    want_a = ((na - x0a) ** 2).flatten(1).mean(1)[~clean_a].mean()
    assert metrics["video_loss"] == pytest.approx(float(want_v), rel=1e-5)
    assert metrics["audio_loss"] == pytest.approx(float(want_a), rel=1e-5)
    assert float(loss) < 10.0


# -- inference -----------------------------------------------------------------------


@pytest.mark.parametrize("given", ["video", "audio"])
def test_a_given_branch_stays_fixed_at_time_zero_through_sampling(given):
    from model.flow_matching import schedule
    from model.samplers import Conditioning, Guidance, KeepLatents, sample

    dit = _random_dit()
    video, audio, _, text = _inputs()
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(video.shape if given == "video" else audio.shape, generator=g)
    keep = KeepLatents(video=clean) if given == "video" else KeepLatents(audio=clean)
    calls = []

    def record(_m, args):
        calls.append((args[0].clone(), args[1].clone(), args[2]))

    handle = dit.register_forward_pre_hook(record)
    out_v, out_a = sample(dit, video, audio, Conditioning(text), schedule(3, 1.0), "heun",
                          Guidance(3.0, 1.0), keep)  # fmt: skip
    handle.remove()
    assert len(calls) == 5  # Heun, 3 steps, guidance rows batched
    for v_in, a_in, (t_v, t_a) in calls:
        held, t_held, t_free = (v_in, t_v, t_a) if given == "video" else (a_in, t_a, t_v)
        # The model sees the given latents exactly (guidance rows too), at time 0.
        assert all(torch.equal(chunk, clean) for chunk in held.chunk(2))
        assert torch.equal(t_held, torch.zeros_like(t_held)) and bool((t_free > 0).all())
    kept_out, free_out = (out_v, out_a) if given == "video" else (out_a, out_v)
    assert torch.equal(kept_out, clean)
    assert not torch.equal(free_out, video if given == "audio" else audio)


@pytest.fixture(scope="module")
def tiny_pipe():
    from model.pipeline import DuetPipeline

    pipe = DuetPipeline.from_preset("tiny", seed=0).eval()
    # AdaLN-zero: a fresh DiT predicts zero velocity and would move nothing at all.
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in pipe.dit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


def test_generate_v2a_and_a2v_keep_the_given_media(tiny_pipe, monkeypatch):
    from model.generate import GenerationRequest, GivenMedia, generate

    cfg = tiny_pipe.config
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (10, cfg.height, cfg.width, 3), dtype=np.uint8)
    seen = []
    inner = tiny_pipe.dit.forward

    def spy(video, audio, t, *args, **kwargs):
        seen.append((video.clone(), audio.clone(), t))
        return inner(video, audio, t, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe.dit, "forward", spy)
    v2a = generate(
        GenerationRequest(steps=2, sampler="euler", given=GivenMedia("v2a", frames, fps=cfg.fps)),
        pipeline=tiny_pipe,
    )
    # 10 frames -> 9 (1 + 4k); the output's picture is the given one, its sound generated.
    assert v2a.clip.num_frames == 9 and np.array_equal(v2a.clip.frames, frames[:9])
    assert v2a.metadata["given"] == "v2a" and v2a.metadata["network_evals"] == 4
    encoded = tiny_pipe.encode_video_frames(frames[:9])
    assert torch.equal(v2a.latents[0], encoded)
    assert all(torch.equal(v[:1], encoded) and torch.equal(t[0], torch.zeros_like(t[0]))
               for v, _, t in seen)  # fmt: skip

    seen.clear()
    audio = (rng.standard_normal((2, cfg.sample_rate // 2)) * 0.1).astype(np.float32)
    a2v = generate(
        GenerationRequest(prompt="a ball", steps=2, sampler="euler",
                          given=GivenMedia("a2v", audio=audio, sample_rate=cfg.sample_rate)),
        pipeline=tiny_pipe,
    )  # fmt: skip
    assert a2v.clip.num_frames == cfg.frames_for_duration(0.5)
    assert np.array_equal(a2v.clip.audio[:, : audio.shape[1]], audio)
    assert a2v.metadata["given"] == "a2v"
    assert all(torch.equal(a[:1], seen[0][1][:1]) and torch.equal(t[1], torch.zeros_like(t[1]))
               for _, a, t in seen)  # fmt: skip
    with pytest.raises(ValueError, match="v2a needs frames"):
        GivenMedia("v2a", frames=None, fps=16.0)
    with pytest.raises(ValueError, match="given mode"):
        GivenMedia("t2a")


# -- duet generate and the job API -----------------------------------------------------


def _write_sources(folder, cfg) -> tuple[str, str]:
    """A 9-frame MP4 (with sound) and a 0.5 s stereo WAV at the tiny preset's size/rate."""
    from scipy.io import wavfile

    from core.media import AVClip, write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    frames = np.repeat(rng.integers(0, 255, (9, cfg.height // 8, cfg.width // 8, 3),
                                    dtype=np.uint8), 8, axis=1).repeat(8, axis=2)  # fmt: skip
    sound = (rng.standard_normal((2, 9 * cfg.sample_rate // 16)) * 0.1).astype(np.float32)
    video = str(folder / "source.mp4")
    write_mp4(video, AVClip(frames, 16.0, sound, cfg.sample_rate), lossless=True)
    wav = str(folder / "beat.wav")
    wavfile.write(wav, cfg.sample_rate, (sound.T[: cfg.sample_rate // 2] * 32767).astype(np.int16))
    return video, wav


def test_duet_generate_v2a_and_a2v(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from core.media import probe_media

    video, wav = _write_sources(tmp_path / "in", TINY)
    for flag, source, frames in (("--v2a", video, 9), ("--a2v", wav, 9)):
        out = tmp_path / f"{flag[2:]}.mp4"
        result = CliRunner().invoke(app, ["generate", "--random-weights", flag, source, "-o",
                                          str(out), "--steps", "1", "--sampler", "euler"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert probe_media(str(out)).frame_count == frames
        sidecar = json.loads(out.with_suffix(".json").read_text())
        assert sidecar["given"] == flag[2:] and sidecar["prompt"] == ""
    both = CliRunner().invoke(app, ["generate", "--random-weights", "--v2a", video, "--a2v", wav,
                                    "-o", str(tmp_path / "x.mp4")])  # fmt: skip
    assert both.exit_code == 2 and "exclude each other" in both.output


KEY = "modality-test-key"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def api(tiny_checkpoint, tmp_path_factory):
    from serve.config import serve_config_from
    from serve.local import build_local_app

    base = tmp_path_factory.mktemp("modality_api")
    assets = base / "assets"
    config = serve_config_from({
        "checkpoint": tiny_checkpoint, "jobs_uri": str(base / "jobs"), "api_keys": [KEY],
        "full": {"steps": 2, "sampler": "euler"},
        "uri_policy": {"allowed_schemes": ["file"], "allowed_local_roots": [str(assets)]},
    })  # fmt: skip
    video, wav = _write_sources(assets, TINY)
    app, backend = build_local_app(config)
    with TestClient(app) as client:
        yield client, video, wav, _write_sources(base / "elsewhere", TINY)[0]
    backend.close()


def _finish(client, job_id, timeout=300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


def test_the_api_runs_v2a_from_a_uri_and_a2v_from_an_upload(api):
    client, video, wav, outside = api
    response = client.post("/v1/jobs", json={"mode": "v2a", "quality": "full",
                                             "source": f"file://{video}"}, headers=AUTH)  # fmt: skip
    assert response.status_code == 202, response.text
    job = _finish(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    meta = client.get(f"/v1/jobs/{job['id']}/metadata", headers=AUTH).json()
    assert meta["given"] == "v2a" and meta["num_frames"] == 9

    with open(wav, "rb") as fh:
        data = fh.read()
    upload = client.post(
        "/v1/jobs/upload",
        data={"request": json.dumps({"mode": "a2v", "prompt": "a ball", "quality": "full"})},
        files=[("source", ("beat.wav", data, "audio/wav"))],
        headers=AUTH,
    )
    assert upload.status_code == 202, upload.text
    job = _finish(client, upload.json()["id"])
    assert job["status"] == "succeeded", job
    meta = client.get(f"/v1/jobs/{job['id']}/metadata", headers=AUTH).json()
    assert meta["given"] == "a2v" and meta["num_frames"] == TINY.frames_for_duration(0.5)
    assert "v2a" in client.get("/v1/info", headers=AUTH).json()["modes"]


def test_the_api_checks_v2a_and_a2v_sources(api):
    client, video, _, outside = api
    # The source URI goes through the one URI guard.
    refused = client.post("/v1/jobs", json={"mode": "v2a", "source": f"file://{outside}"},
                          headers=AUTH)  # fmt: skip
    assert refused.status_code == 403, refused.text
    missing = client.post("/v1/jobs", json={"mode": "a2v"}, headers=AUTH)
    assert missing.status_code == 422 and "needs a source audio track" in missing.text
    # An a2v source must be audio: a picture is refused before any job runs.
    from PIL import Image

    buf = __import__("io").BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    not_audio = client.post(
        "/v1/jobs/upload",
        data={"request": json.dumps({"mode": "a2v"})},
        files=[("source", ("beat.wav", buf.getvalue(), "audio/wav"))],
        headers=AUTH,
    )
    assert not_audio.status_code == 415, not_audio.text
    mixed = client.post("/v1/jobs", json={"prompt": "x", "source": f"file://{video}"},
                        headers=AUTH)  # fmt: skip
    assert mixed.status_code == 422
