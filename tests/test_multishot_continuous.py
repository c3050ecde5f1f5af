"""Multi-shot training on continuous footage, and a plan's text within 77 tokens.

A sequence of shots is one file encoded once (one first-frame latent, one audio
front pad, both at its start; none at its cuts); its latent steps read their own
shot's text; a four-shot plan's text fits the 77-token budget with each shot's
words routed to its own time span; a checkpoint config from before (32 tokens, no
``multishot`` field) loads as it was trained and computes the old text.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from core.media import AVClip, read_clip, write_mp4
from model.configs import ModelConfig, get_config
from model.multishot import SHARED, Shot, ShotPlan, layout, shot_text
from model.pipeline import DuetPipeline
from model.text_encoder import FrozenTextEncoder, fit_lengths
from pipelines.train.conditioning import join_shots
from pipelines.train.sequences import (
    SequenceBatches,
    SequenceError,
    SequenceStore,
    _runs,
    encode_sequences,
    load_sequences,
    write_sequences,
)

FPS, SR = 16.0, 16000
# Odd shot lengths, so boundaries fall inside latent steps as well as on them.
SEQUENCES = {
    "cutcut": ([13, 21, 15], ["cut", "cut"]),
    "cutfade": ([17, 16, 16], ["cut", "fade"]),
}
CAPTIONS = ["a red circle bounces", "a blue square slides", "a green triangle spins"]


def _shot(n: int, colour, hz: float, start_frame: int) -> AVClip:
    """A solid-colour shot with a steady tone (sound from its first sample to its last)."""
    frames = np.empty((n, 64, 64, 3), np.uint8)
    frames[:] = colour
    t = (np.arange(int(round(n / FPS * SR))) + start_frame / FPS * SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return AVClip(frames=frames, fps=FPS, audio=np.stack([tone, tone]), sample_rate=SR)


@pytest.fixture(scope="module")
def encoder():
    return FrozenTextEncoder()  # 77 tokens, the new presets' budget


@pytest.fixture(scope="module")
def pipe(encoder):
    return DuetPipeline.from_preset("tiny", seed=0, text_encoder=encoder).eval()


@pytest.fixture(scope="module")
def encoded(pipe, tmp_path_factory):
    """Two sequences written as footage, loaded, and encoded into a cache, with every
    VAE encode call's input recorded."""
    root = tmp_path_factory.mktemp("seq")
    records = []
    for name, (lengths, transitions) in SEQUENCES.items():
        starts = np.cumsum([0] + lengths[:-1]).tolist()
        shots = [
            _shot(n, c, hz, s)
            for n, c, hz, s in zip(
                lengths,
                [(200, 40, 40), (40, 40, 200), (40, 200, 40)],
                [330, 440, 550],
                starts,
                strict=True,
            )
        ]
        uri = str(root / f"{name}.mp4")
        write_mp4(uri, join_shots(shots, transitions, fade_frames=8), lossless=True)
        records.append(
            {
                "sequence_id": name, "source_id": "src", "sequence_uri": uri, "fps": FPS,
                "num_frames": sum(lengths), "shot_start_frames": starts,
                "transitions": transitions, "shot_captions": CAPTIONS,
                "subject": "a shape on a gray floor", "has_audio": True, "split": "train",
            }
        )  # fmt: skip
    manifest = str(root / "clips.parquet")  # the sequences table sits beside it
    write_sequences(str(root / "sequences.parquet"), records)
    rows = load_sequences(manifest, pipe.config)
    calls = {"video": [], "audio": []}
    originals = pipe.video_vae.encode, pipe.audio_vae.encode

    def spy(kind, original):
        def encode(x):
            calls[kind].append(x.detach().clone())
            return original(x)

        return encode

    pipe.video_vae.encode = spy("video", originals[0])
    pipe.audio_vae.encode = spy("audio", originals[1])
    try:
        cache = encode_sequences(pipe, rows, str(root / "cache"), shard_size=8)
    finally:
        pipe.video_vae.encode, pipe.audio_vae.encode = originals
    return rows, SequenceStore(cache), calls


def test_a_sequence_is_one_continuous_encode_without_silence_at_cuts(pipe, encoded):
    rows, store, calls = encoded
    cfg = pipe.config
    assert [r.bucket for r in rows] == [49, 49]  # 49 frames = 1 + 4 * 12
    # One encode per sequence, of all its frames and all its sound.
    assert len(calls["video"]) == len(calls["audio"]) == len(rows)
    for row, video, audio in zip(rows, calls["video"], calls["audio"], strict=True):
        assert video.shape[2] == row.bucket
        sample = store.sequence(row.sequence_id)
        n_lat = cfg.num_latent_frames(row.bucket)
        lengths = SEQUENCES[row.sequence_id][0]
        assert sample.video.shape[1] == n_lat == 13
        if row.sequence_id == "cutcut":  # shots encoded apart would give 4 + 6 + 4 steps
            assert sum(cfg.num_latent_frames(1 + 4 * ((n - 1) // 4)) for n in lengths) == 14
        assert sample.audio.shape[1] == n_lat * cfg.audio_latents_per_video_latent
        # Sound right across every cut: no padding silence (stitching put ~190 ms there).
        wav = audio[0].mean(0)  # (N,) as the audio VAE saw it
        assert wav.shape[0] == cfg.audio_samples_for_latents(n_lat)
        pad = pipe.audio_front_pad
        win = SR // 50  # 20 ms
        starts = np.cumsum(lengths)[:-1]
        for start, kind in zip(starts, SEQUENCES[row.sequence_id][1], strict=True):
            at = pad + int(start / FPS * SR)
            rms = [float(wav[i : i + win].pow(2).mean().sqrt()) for i in range(at - 5 * win, at + 10 * win, win)]  # fmt: skip
            if kind == "cut":
                assert min(rms) > 0.2, (row.sequence_id, start, rms)
            else:  # a fade dips to silence at its centre, as filmed
                assert rms[5] < 0.1 < max(rms)
        # The cached latents are those of the whole file encoded as one clip.
        whole_v, whole_a = pipe.encode_clip(read_clip(row.uri, require_audio=False), row.bucket)
        assert torch.allclose(sample.video, whole_v[0], atol=1e-5)
        assert torch.allclose(sample.audio, whole_a[0], atol=1e-5)


def test_latent_steps_read_their_own_shot_text(pipe, encoded):
    rows, store, _ = encoded
    cfg = pipe.config
    batch = SequenceBatches(rows, store, cfg).build(6, torch.Generator().manual_seed(0))
    assert set(batch.clip_ids) == {"cutcut", "cutfade"}  # both drawn: (B, T) layouts
    m = cfg.audio_latents_per_video_latent
    for b, seq in enumerate(batch.clip_ids):
        lengths = SEQUENCES[seq][0]
        shot_of_frame = np.repeat(np.arange(len(lengths)), lengths)
        got = batch.shots.video_latent_shot[b].tolist()
        for i, shot in enumerate(got):
            frames = [0] if i == 0 else list(range(4 * i - 3, 4 * i + 1))
            if len(set(shot_of_frame[frames])) == 1:  # the step lies inside one shot
                assert shot == shot_of_frame[frames[0]], (seq, i, got)
            else:
                assert shot in set(shot_of_frame[frames])
        audio = batch.shots.audio_latent_shot[b].view(-1, m)
        assert (audio.float().mean(1) - torch.tensor(got).float()).abs().max() <= 0.5
        # Text: shot s's tokens are read by shot s's latents only; the subject by all.
        ids = batch.text.shot_ids[b][batch.text.mask[b]]
        assert set(ids.tolist()) == {SHARED, 0, 1, 2}
    hw = (batch.video.shape[-2] // cfg.dit.video_patch) * (batch.video.shape[-1] // cfg.dit.video_patch)  # fmt: skip
    token_shot = batch.shots.video_latent_shot.repeat_interleave(hw, dim=-1)
    mask = pipe.dit._text_mask(batch.text, token_shot, n_ref=0)[:, 0]  # (B, N, L)
    for b in range(len(batch.clip_ids)):
        ids = batch.text.shot_ids[b]
        for n in range(0, token_shot.shape[1], hw):
            readable = set(ids[mask[b, n]].tolist())
            assert readable == {SHARED, int(token_shot[b, n])}


def test_a_four_shot_plan_fits_77_tokens_routed_per_shot(pipe, encoder):
    plan = ShotPlan(
        [
            Shot("a red circle bounces twice on a gray floor near the wall", 1.0),
            Shot("a blue square slides slowly from left to right", 1.0, "fade"),
            Shot("a green triangle spins in the middle of a slate floor", 1.0, "cut"),
            Shot("a yellow circle rolls away and stops by the door", 1.0, "fade"),
        ],
        subject="a toy on a gray floor in a small room",
    )
    cfg = pipe.config
    assert cfg.text.max_tokens == 77 and get_config("base").text.max_tokens >= 77
    text = shot_text(encoder, plan, cfg)
    ids = text.shot_ids[0]
    assert ids.shape[0] <= 77
    tok = encoder.tokenizer
    for s, shot in enumerate(plan.shots):  # every word of every shot kept
        words = [shot.prompt]
        words += [shot.transition] if s else []  # transition in and out: one token each
        words += [plan.shots[s + 1].transition] if s < 3 else []
        assert int((ids == s).sum()) == sum(len(tok(w, add_special_tokens=False)["input_ids"]) for w in words)  # fmt: skip
    _, shots = layout(plan, cfg)
    mask = pipe.dit._text_mask(text, shots.video_latent_shot, n_ref=0)[0, 0]  # (T, L)
    for row, shot in zip(mask, shots.video_latent_shot.tolist(), strict=True):
        assert set(ids[row].tolist()) == {SHARED, shot}
    assert set(shots.video_latent_shot.tolist()) == {0, 1, 2, 3}
    # Over budget: prompts lose tail words, never a shot; impossible budgets say so.
    assert fit_lengths([12, 2, 12], [True, False, True], 10) == [4, 2, 4]
    with pytest.raises(ValueError, match="at least"):
        fit_lengths([5, 5, 5], [False, False, True], 8)


def test_an_old_32_token_checkpoint_config_loads_and_computes_the_old_text(encoder):
    # The config recorded by the checkpoint shipped on 2026-11-26 (32-token prompts,
    # stitched multi-shot), kept here after the shipped checkpoint moved on.
    with open(
        os.path.join(os.path.dirname(__file__), "fixtures", "compact_config_2026-11-26.json")
    ) as f:
        recorded = json.load(f)["config"]
    assert "multishot" not in recorded
    old = ModelConfig.from_dict(recorded)
    assert old.text.max_tokens == 32 and old.multishot == "stitched"
    new = get_config("compact")
    again = ModelConfig.from_dict(new.to_dict())  # a new checkpoint keeps its own
    assert again.text.max_tokens == 77 and again.multishot == "continuous"
    plan = ShotPlan([Shot("a red circle", 1.0), Shot("a blue square", 1.0, "fade")], "a toy")
    text = shot_text(encoder, plan, old)  # each prompt alone, no transition words
    parts = [encoder.embed_tokens(x) for x in ("a toy", "a red circle", "a blue square")]
    assert torch.equal(text.tokens[0], torch.cat(parts))
    assert text.shot_ids[0].tolist() == sum(([i - 1] * p.shape[0] for i, p in enumerate(parts)), [])


def test_bad_sequence_rows_are_refused_and_footage_runs_follow_detected_shots(tmp_path):
    good = {
        "sequence_id": "x", "source_id": "s", "sequence_uri": "x.mp4", "fps": FPS,
        "num_frames": 40, "shot_start_frames": [0, 20], "transitions": ["cut"],
        "shot_captions": ["a", "b"], "subject": "", "has_audio": True, "split": "train",
    }  # fmt: skip
    for bad, match in (
        ({"shot_start_frames": [0]}, "at least 2"),
        ({"shot_start_frames": [0, 45]}, "starts at frame"),
        ({"transitions": ["wipe"]}, "transitions"),
        ({"shot_captions": ["a"]}, "caption per shot"),
    ):
        with pytest.raises(SequenceError, match=match):
            write_sequences(str(tmp_path / "s.parquet"), [{**good, **bad}])
    shots = [
        {"index": i, "start_s": i, "end_s": i + 1.0, "transition_in": t}
        for i, t in enumerate(["start", "cut", "fade", "cut", "continued", "cut", "cut"])
    ]
    captioned = {("s", i) for i in range(7) if i != 6}
    runs = list(_runs(shots, captioned, "s", 3, 12.0))
    # 0-1-2 (max 3 shots), then 3 alone (4 only continues it), 4-5; 6 has no caption.
    assert [[s["index"] for s in r] for r in runs] == [[0, 1, 2], [4, 5]]
