"""References taught by role (pipelines.train.reference_pairs, pipelines.train.batches).

Each synthetic pair builder renders, from the target's seed, a reference that
shares exactly its role's attribute with the target; the synthetic world's probes
(colour/shape detection, centroid tracks, audio onsets) check that the attribute is
shared and the others are not. The batch builder is checked on a hand-made latent
cache whose every clip holds its own number, so a slot shows which clip filled it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as save_safetensors

from core import storage
from core.probes import detect_objects, detect_onsets
from core.synth import render_shot
from model.reference_binding import Binding, check_bindings, embed_prompt, split_bindings
from pipelines.train.batches import BatchBuilder
from pipelines.train.conditioning import BACKDROPS, CorpusSpec, backdrop_pixels, build_corpus
from pipelines.train.config import ReferenceSampling
from pipelines.train.data import ClipRow
from pipelines.train.latents import LatentStore, write_index_entries
from pipelines.train.reference_pairs import (
    Geometry,
    ReferencePair,
    ReferencePairError,
    pairs_table_uri,
    read_pairs,
    render_reference,
    source_pairs,
)

VISUAL = Geometry(width=128, height=128, frames=17)  # shapes read reliably from 128 px
AUDIO = Geometry(width=64, height=64, frames=48)  # 3 s: five or more beats
SEEDS = (1, 4)


def _target(scene: str, seed: int, g: Geometry):
    clip, truth = render_shot(
        scene, seed, g.frames / g.fps, g.width, g.height, g.fps, g.sample_rate,
        guard_start_s=g.guard_s, guard_end_s=g.guard_s,
    )  # fmt: skip
    return clip, truth


def _backdrop(frames: np.ndarray) -> str:
    counts = backdrop_pixels(frames[:1])
    return max(BACKDROPS, key=counts.get)


def _nearest(dets: list[dict], x: float, y: float) -> dict:
    return min(dets, key=lambda d: math.hypot(d["x"] - x, d["y"] - y))


def _tempo_bpm(audio: np.ndarray, sample_rate: int) -> float:
    onsets = detect_onsets(audio, sample_rate)
    assert len(onsets) >= 4, onsets
    return 60.0 / float(np.median(np.diff(onsets)))


@pytest.mark.parametrize("seed", SEEDS)
def test_image_reference_shares_the_subjects_colour_and_shape_only(seed):
    clip, truth = _target("day_night", seed, VISUAL)
    ref = render_reference("image", seed, VISUAL, "day_night")
    x0, y0 = truth["objects"][0]["trajectory"][0][1:]
    subject = _nearest(detect_objects(clip.frames[0]), x0, y0)  # the probe's reading
    seen = detect_objects(ref.clip.frames[0])
    assert {(d["color"], d["shape"]) for d in seen} == {(subject["color"], subject["shape"])}
    (other,) = seen
    # Everything else differs: position, size, backdrop.
    assert math.hypot(other["x"] - subject["x"], other["y"] - subject["y"]) > 0.2 * VISUAL.width
    assert not 0.7 < other["area"] / subject["area"] < 1.4
    assert _backdrop(ref.clip.frames) != _backdrop(clip.frames)
    assert ref.kind == "image" and ref.attribute == "appearance"
    assert ref.shared == {"color": subject["color"], "shape": subject["shape"]}


def _tracks(frames: np.ndarray) -> np.ndarray:
    """(T, O, 2) centroids, objects ordered left to right in every frame."""
    out = []
    for frame in frames:
        dets = sorted(detect_objects(frame), key=lambda d: d["x"])
        out.append([(d["x"], d["y"]) for d in dets])
    counts = {len(f) for f in out}
    assert len(counts) == 1, counts  # no object lost or merged on any frame
    return np.asarray(out)


@pytest.mark.parametrize("seed", SEEDS)
def test_video_reference_shares_the_trajectory_only(seed):
    clip, _ = _target("bouncing_balls", seed, VISUAL)
    ref = render_reference("video", seed, VISUAL)
    a, b = _tracks(clip.frames), _tracks(ref.clip.frames)
    assert a.shape == b.shape
    # Same motion: x equal; y the same up to each object's constant offset (a new
    # shape rests on the floor at another centroid height).
    assert np.abs(a[..., 0] - b[..., 0]).max() < 1.0
    dy = a[..., 1] - b[..., 1]
    assert np.abs(dy - dy.mean(0)).max() < 1.0
    moving = a[..., 1].std(0) > 2.0
    assert moving.any()
    for o in np.nonzero(moving)[0]:
        assert np.corrcoef(a[:, o, 1], b[:, o, 1])[0, 1] > 0.99
    # Other colours, other shapes, other backdrop.
    first_a = sorted(detect_objects(clip.frames[0]), key=lambda d: d["x"])
    first_b = sorted(detect_objects(ref.clip.frames[0]), key=lambda d: d["x"])
    assert not {d["color"] for d in first_a} & {d["color"] for d in first_b}
    assert all(x["shape"] != y["shape"] for x, y in zip(first_a, first_b, strict=True))
    assert _backdrop(ref.clip.frames) != _backdrop(clip.frames)


@pytest.mark.parametrize("seed", SEEDS)
def test_audio_reference_shares_the_tempo_only(seed):
    clip, truth = _target("beat_pulse", seed, AUDIO)
    ref = render_reference("audio", seed, AUDIO)
    bpm_a = _tempo_bpm(clip.audio, clip.sample_rate)
    bpm_b = _tempo_bpm(ref.clip.audio, ref.clip.sample_rate)
    assert abs(bpm_a - truth["bpm"]) / truth["bpm"] < 0.02
    assert abs(bpm_b - bpm_a) / bpm_a < 0.02
    # Other beat phase, other colours, other backdrop.
    assert abs(detect_onsets(clip.audio, 16000)[0] - detect_onsets(ref.clip.audio, 16000)[0]) > 0.04
    colours_a = {d["color"] for d in detect_objects(clip.frames[0])}
    colours_b = {d["color"] for d in detect_objects(ref.clip.frames[0])}
    assert colours_b and not colours_a & colours_b
    assert _backdrop(ref.clip.frames) != _backdrop(clip.frames)


def test_corpus_writes_versioned_pairs_and_old_manifests_still_read(tmp_path):
    spec = CorpusSpec(
        sources=1, shots_per_source=1, frames_per_shot=17,
        reference_kinds=("image", "video", "audio"), tempo_shots=1,
    )  # fmt: skip
    manifest = build_corpus(str(tmp_path / "corpus"), spec)
    table = pq.read_table(manifest)
    ids = set(table.column("clip_id").to_pylist())
    pairs = read_pairs(pairs_table_uri(manifest))
    assert {(p.kind, p.attribute) for p in pairs} == {
        ("image", "appearance"), ("video", "trajectory"), ("audio", "tempo")
    }  # fmt: skip
    assert all(p.exact and p.target in ids and p.reference in ids for p in pairs)
    # Each reference is a source of its own: no same-source reference mixes roles.
    sources = dict(
        zip(table.column("clip_id").to_pylist(), table.column("source_id").to_pylist(), strict=True)
    )
    assert all(sources[p.reference] != sources[p.target] for p in pairs)
    # A manifest from before pairs has no table: read as none.
    assert read_pairs(str(tmp_path / "nowhere" / "reference_pairs.parquet")) is None
    # Another schema version is refused, saying which.
    stored = pq.read_table(pairs_table_uri(manifest))
    future = stored.set_column(
        0, "schema_version", pa.array([2] * stored.num_rows, pa.int32())
    ).replace_schema_metadata({b"duet.schema_version": b"2"})
    bad = str(tmp_path / "future.parquet")
    pq.write_table(future, bad)
    with pytest.raises(ReferencePairError, match="schema version 2"):
        read_pairs(bad)


def test_real_corpus_pairs_come_from_other_shots_and_speaker_turns():
    rows = [
        {"clip_id": "s0", "source_id": "S", "shot_index": 0, "keep": True, "has_audio": True},
        {"clip_id": "s1", "source_id": "S", "shot_index": 1, "keep": True, "has_audio": True},
        {"clip_id": "s1b", "source_id": "S", "shot_index": 1, "keep": True, "has_audio": True},
        {"clip_id": "t0", "source_id": "T", "shot_index": 0, "keep": True, "has_audio": True},
    ]
    pairs, skipped = source_pairs(pa.Table.from_pylist(rows))
    image = {(p.target, p.reference) for p in pairs if p.kind == "image"}
    assert image == {("s0", "s1"), ("s0", "s1b"), ("s1", "s0"), ("s1b", "s0")}
    assert not [p for p in pairs if p.kind == "audio"]
    assert len(skipped) == 1 and "speaker" in skipped[0]
    speakers = ["A", "B", "A", "A"]
    with_speaker = pa.Table.from_pylist(
        [{**r, "speaker": s} for r, s in zip(rows, speakers, strict=True)]
    )
    pairs, skipped = source_pairs(with_speaker)
    audio = {(p.target, p.reference) for p in pairs if p.kind == "audio"}
    assert audio == {("s0", "s1b"), ("s1b", "s0")} and not skipped  # t0 is another source


# ---------------------------------------------------------------------------------
# The batch builder.

CV, CA, H, W, D, M = 2, 3, 2, 2, 4, 4
# clip id -> (source, latent frames, caption tokens, has audio)
CLIPS = {
    "a0": ("A", 3, 2, True),
    "a1": ("A", 3, 0, True),  # no caption: its bindings are its only text
    "r0": ("r0", 3, 3, True),
    "r1": ("r1", 3, 3, True),
    "r2": ("r2", 3, 3, True),
    "r3": ("r3", 3, 3, False),  # no sound: never an audio reference
}
NUMBER = {cid: float(i + 1) for i, cid in enumerate(CLIPS)}
PAIRS = [
    ReferencePair("a0", "r0", "image", "appearance", True),
    ReferencePair("a0", "r1", "image", "appearance", True),
    ReferencePair("a0", "r2", "video", "trajectory", True),
    ReferencePair("a1", "r2", "audio", "tempo", True),
    ReferencePair("a1", "r3", "audio", "tempo", True),
]


def _row(cid: str) -> ClipRow:
    source, _, _, audio = CLIPS[cid]
    return ClipRow(cid, source, f"mem://{cid}.mp4", 0.0, 17, 17, cid, audio, math.nan, 0)


@pytest.fixture
def store(tmp_path) -> LatentStore:
    uri = str(tmp_path / "cache")
    tensors, index = {}, {}
    for cid, (_, frames, tokens, audio) in CLIPS.items():
        n = NUMBER[cid]
        tensors[f"{cid}.video"] = torch.full((CV, frames, H, W), n)
        tensors[f"{cid}.audio"] = torch.full((CA, frames * M), n)
        tensors[f"{cid}.text"] = torch.full((tokens, D), n)
        tensors[f"{cid}.has_audio"] = torch.tensor([int(audio)])
        index[cid] = {"shard": "shard-00000.safetensors", "bucket": 17}
    storage.write_bytes(storage.join(uri, "shard-00000.safetensors"), save_safetensors(tensors))
    write_index_entries(uri, index)
    return LatentStore(uri)


class HashEncoder:
    """A deterministic stand-in for the frozen text encoder (loading MiniLM takes
    seconds): one row per distinct piece of text, ``embed_dim`` wide."""

    def __init__(self, embed_dim: int = D):
        self.embed_dim = embed_dim

    def embed_tokens(self, text: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return torch.rand(1, self.embed_dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompts: list[str]):
        rows = [self.embed_tokens(p) for p in prompts]
        return torch.cat(rows)[:, None], torch.ones(len(rows), 1, dtype=torch.bool)


def _builder(store, pairs=PAIRS, **sampling) -> BatchBuilder:
    rows = [_row(c) for c in CLIPS]
    return BatchBuilder(
        rows, rows, store, ReferenceSampling(**sampling), 5, (9, 3, 3), 3.0, M,
        pairs=pairs, binder=HashEncoder().embed_tokens,
    )  # fmt: skip


def _number(slot, row: int) -> float | None:
    if slot is None or not bool(slot.present[row]):
        return None
    return float(slot.latent[row].flatten()[0])


def test_batches_carry_role_references_bound_in_the_text_and_an_i2v_flag(store):
    builder = _builder(
        store, reference_probability=0.6, binding_probability=1.0, i2v_probability=0.3
    )
    enc = HashEncoder()
    n, with_refs, i2v, image_slots = 0, 0, 0, set()
    for seed in range(150):
        batch = builder.build([0, 1], torch.Generator().manual_seed(seed))  # a0, a1
        refs = batch.references
        for row, cid in enumerate(batch.clip_ids):
            n += 1
            i2v += bool(batch.i2v[row])
            # The I2V slot (the model's last image slot) holds the clip's own first
            # frame exactly when the flag says so.
            own = _number(refs.images[8], row) if refs and len(refs.images) == 9 else None
            assert (own == NUMBER[cid]) == bool(batch.i2v[row])
            expected = {}
            for kind in ("images", "videos", "audios"):
                for s, slot in enumerate(getattr(refs, kind) if refs else []):
                    x = _number(slot, row)
                    if x is None or (kind == "images" and s == 8):
                        continue
                    ref = next(c for c, v in NUMBER.items() if v == x)
                    assert not (kind == "audios" and not CLIPS[ref][3])  # r3 has no sound
                    pair = next(p for p in PAIRS if {p.target, p.reference} == {cid, ref})
                    assert pair.kind + "s" == kind  # a role reference in its kind's slots
                    expected[f"@{pair.kind}{s + 1} {pair.word}"] = ref
                    if kind == "images":
                        image_slots.add(s)
            with_refs += bool(expected)
            assert set(batch.bindings[row]) == set(expected)
            # The text: the caption's tokens, then each binding phrase's, in the
            # order the bindings list them -- what generation makes of the prompt.
            tokens = batch.text.tokens[row][batch.text.mask[row]]
            n_caption = CLIPS[cid][2]
            assert bool((tokens[:n_caption] == NUMBER[cid]).all())
            tail = [enc.embed_tokens(p) for p in batch.bindings[row]]
            if tail:
                assert torch.equal(tokens[n_caption:], torch.cat(tail))
            assert bool(batch.text_missing[row]) == (n_caption == 0 and not tail)
    assert abs(i2v / n - 0.3) < 0.07
    assert abs(with_refs / n - 0.6) < 0.08
    assert len(image_slots) >= 4  # slots drawn in random order


def test_no_pairs_no_bindings_and_the_legacy_own_frame_rate(store):
    builder = _builder(store, reference_probability=1.0, binding_probability=0.0,
                       own_frame_probability=1.0, i2v_probability=0.0)  # fmt: skip
    batch = builder.build([0, 2], torch.Generator().manual_seed(0))
    assert batch.i2v.tolist() == [True, True]  # the old name wins
    assert batch.bindings == ((), ())
    # Without a pair table, references come from other shots of the source: a0 and
    # a1 share source and shot index here, so neither has any.
    plain = _builder(store, pairs=None, reference_probability=1.0, i2v_probability=0.0)
    assert plain.build([0, 1], torch.Generator().manual_seed(0)).references is None


def test_bindings_are_parsed_checked_and_encoded_as_training_joins_them(store):
    rest, bindings = split_bindings("a circle @image2 subject bounces @audio1 tempo")
    assert rest == "a circle bounces"
    assert bindings == [Binding("image", 1, "subject"), Binding("audio", 0, "tempo")]
    with pytest.raises(ValueError, match="@image2"):
        check_bindings(bindings, {"image": 1, "audio": 1})
    check_bindings(bindings, {"image": 2, "audio": 1})
    enc = HashEncoder()
    tokens = embed_prompt(enc, "a circle @image2 subject bounces @audio1 tempo")
    pieces = ["a circle bounces", "@image2 subject", "@audio1 tempo"]
    assert torch.equal(tokens, torch.cat([enc.embed_tokens(p) for p in pieces]))
    assert torch.equal(embed_prompt(enc, "no binding here"), enc.embed_tokens("no binding here"))
    # The batch builder's text for a binding is the same join.
    builder = _builder(store)
    caption = enc.embed_tokens("a circle bounces")
    assert torch.equal(builder._text(caption, pieces[1:]), tokens)


def test_generate_takes_bindings_and_a_first_frame_in_the_i2v_slot():
    """generate() encodes a prompt's bindings as training joins them, refuses a
    binding to a reference that is not given, and puts an I2V first frame in the
    model's last image slot."""
    from model.configs import get_config
    from model.generate import GenerationRequest, ReferenceSet, _reference_latents, generate
    from model.pipeline import DuetPipeline
    from model.reference_binding import encode_prompt

    dim = get_config("tiny").text.embed_dim
    pipe = DuetPipeline.from_preset("tiny", 0, HashEncoder(dim)).eval()
    frame = np.zeros((64, 64, 3), np.uint8)
    refs = ReferenceSet(images=[frame], first_frame=np.full((64, 64, 3), 200, np.uint8))
    latents = _reference_latents(pipe, refs)
    slots = pipe.config.dit.max_image_refs
    assert len(latents.images) == slots and latents.images[1:-1] == [None] * (slots - 2)
    assert not torch.equal(latents.images[0].latent, latents.images[-1].latent)
    text = encode_prompt(pipe, "a circle bounces @image1 subject", {"image": 1})
    joined = torch.cat(
        [pipe.text_encoder.embed_tokens(p) for p in ("a circle bounces", "@image1 subject")]
    )
    assert torch.equal(text.tokens[0].cpu(), joined) and bool(text.mask.all())
    request = GenerationRequest(
        prompt="a circle bounces @image2 subject", duration_s=0.3, steps=1, references=refs
    )
    with pytest.raises(ValueError, match="@image2"):
        generate(request, pipeline=pipe)
    ok = generate(
        GenerationRequest(prompt="@image1 subject", duration_s=0.3, steps=1, references=refs),
        pipeline=pipe,
    )
    assert ok.clip.num_frames > 0
