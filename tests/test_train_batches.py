"""The DiT batch builder (pipelines.train.batches) on a hand-made latent cache.

Every clip's cached latents are filled with its own number, so a batch shows where
each of its tensors came from: the right clip in the right row, the I2V slot (the
model's last image slot) the clip's own first frame, the other slots other shots of
the same source (no pair table here; no audio references without diarization), all
cut to the stated lengths. Role pairs are tested in tests/test_reference_pairs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save as save_safetensors

from core import storage
from pipelines.train.batches import BatchBuilder, pad_text
from pipelines.train.config import ReferenceSampling
from pipelines.train.data import ClipRow, sft_subset
from pipelines.train.latents import LatentStore, write_index_entries

CV, CA, H, W, D, M = 2, 3, 2, 2, 4, 4  # latent channels, grid, text dim, audio per video
MAX_TOKENS, REF_STRIDE = 5, 3.0
# clip id -> (source, start_s, latent frames, caption tokens, has audio)
CLIPS = {
    "a0": ("A", 0.0, 3, 2, True),
    "a1": ("A", 3.0, 3, 7, True),  # more tokens than the model takes
    "a2": ("A", 6.0, 4, 0, False),  # no caption, no sound
    "a3": ("A", 9.0, 3, 3, True),
    "b0": ("B", 0.0, 3, 4, True),  # alone in its source: no references possible
}
NUMBER = {cid: float(i + 1) for i, cid in enumerate(CLIPS)}


def _row(cid: str) -> ClipRow:
    source, start, frames, _, audio = CLIPS[cid]
    # Each clip its own shot: same-source references come from other shots.
    return ClipRow(
        cid, source, f"mem://{cid}.mp4", start, 33, 33, cid, audio, math.nan, int(start // 3)
    )


@pytest.fixture
def store(tmp_path) -> LatentStore:
    uri = str(tmp_path / "cache")
    tensors, index = {}, {}
    for cid, (_, _, frames, tokens, audio) in CLIPS.items():
        n = NUMBER[cid]
        # Latent frame k of clip n holds n + k / 10: slots show which frames they took.
        steps = torch.arange(frames, dtype=torch.float32) / 10
        tensors[f"{cid}.video"] = (n + steps).view(1, frames, 1, 1).expand(CV, frames, H, W)
        tensors[f"{cid}.audio"] = (n + steps.repeat_interleave(M)).expand(CA, frames * M)
        tensors[f"{cid}.text"] = torch.full((tokens, D), n)
        tensors[f"{cid}.has_audio"] = torch.tensor([int(audio)])
        index[cid] = {"shard": "shard-00000.safetensors", "bucket": 33}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    storage.write_bytes(storage.join(uri, "shard-00000.safetensors"), save_safetensors(tensors))
    write_index_entries(uri, index)
    return LatentStore(uri)


def _builder(store, rows=tuple(CLIPS), max_refs=(9, 3, 3), **sampling) -> BatchBuilder:
    return BatchBuilder(
        [_row(c) for c in rows],
        [_row(c) for c in CLIPS],
        store,
        ReferenceSampling(**sampling),
        MAX_TOKENS,
        max_refs,
        REF_STRIDE,
        M,
    )


def test_pad_text_pads_masks_and_truncates():
    rows = [torch.ones(2, D), torch.full((7, D), 2.0), torch.zeros(0, D)]
    tokens, mask, ids = pad_text(rows, None, MAX_TOKENS)
    assert tokens.shape == (3, MAX_TOKENS, D) and ids is None
    assert mask.sum(1).tolist() == [2, MAX_TOKENS, 0]
    assert bool((tokens[0, :2] == 1).all()) and bool((tokens[0, 2:] == 0).all())
    _, short_mask, ids = pad_text(rows[:1], [torch.tensor([0, 1])], MAX_TOKENS)
    assert short_mask.shape == (1, 2) and ids.tolist() == [[0, 1]]


def test_a_batch_holds_each_rows_own_latents_cut_to_a_common_length(store):
    builder = _builder(store, reference_probability=0.0, i2v_probability=0.0)
    batch = builder.build([0, 2, 4], torch.Generator().manual_seed(0))  # a0, a2, b0
    assert batch.clip_ids == ("a0", "a2", "b0") and batch.references is None
    # a2 has 4 latent frames, the others 3: all cut to 3 (and audio to 3 M).
    assert batch.video.shape == (3, CV, 3, H, W) and batch.audio.shape == (3, CA, 3 * M)
    for i, cid in enumerate(batch.clip_ids):
        assert torch.allclose(batch.video[i, 0, :, 0, 0], NUMBER[cid] + torch.tensor([0, 0.1, 0.2]))
        assert float(batch.audio[i, 0, 0]) == NUMBER[cid]
    assert batch.text.tokens.shape == (3, 4, D)  # the longest caption here: b0's 4 tokens
    assert batch.text.mask.sum(1).tolist() == [2, 0, 4]
    assert batch.text_missing.tolist() == [False, True, False]
    assert batch.has_audio.tolist() == [True, False, True]
    assert float(batch.text.tokens[2, 3, 0]) == NUMBER["b0"]
    long = builder.build([1], torch.Generator().manual_seed(0))
    assert long.text.mask.sum().item() == MAX_TOKENS  # a1's 7 tokens cut to the model's 5


def _slot_numbers(slot, row: int) -> float | None:
    if slot is None or not bool(slot.present[row]):
        return None
    return float(slot.latent[row].flatten()[0])


def test_references_come_from_the_clips_own_source_as_the_slots_promise(store):
    builder = _builder(store, reference_probability=1.0, i2v_probability=1.0)
    ref_frames = int(min(ReferenceSampling().max_reference_latent_frames, REF_STRIDE))
    counts = {"images": set(), "videos": set(), "audios": set()}
    for seed in range(40):
        batch = builder.build([0, 1, 4], torch.Generator().manual_seed(seed))  # a0, a1, b0
        refs = batch.references
        if refs is None:  # every kind drew 0 slots for both A rows
            continue
        for row, cid in enumerate(batch.clip_ids):
            own = NUMBER[cid]
            others = {NUMBER[c] for c, v in CLIPS.items() if v[0] == CLIPS[cid][0] and c != cid}
            with_sound = {NUMBER[c] for c in CLIPS if NUMBER[c] in others and CLIPS[c][4]}
            images = [_slot_numbers(s, row) for s in refs.images]
            videos = [_slot_numbers(s, row) for s in refs.videos]
            audios = [_slot_numbers(s, row) for s in refs.audios]
            assert images[8] == own  # the I2V slot: this clip's own first frame
            if cid == "b0":  # no other clip in its source: nothing else, zeros in the slots
                rest = images[:8] + videos + audios
                assert rest == [None] * len(rest)
                for slot in refs.images[:8] + refs.videos + refs.audios:
                    if slot is not None:
                        assert not bool(slot.latent[row].any())
                continue
            present = [x for x in images[:8] if x is not None]
            counts["images"].add(len(present))
            assert all(x in others for x in present) and len(set(present)) == len(present)
            counts["videos"].add(sum(x is not None for x in videos))
            assert all(x in others for x in videos if x is not None)
            # Audio references need the speaker's other turns: no diarization here.
            assert audios == [None] * len(audios)
            del with_sound
        for slot in refs.images:
            assert slot is None or slot.latent.shape[1:] == (CV, 1, H, W)
        for slot in refs.videos:  # openings of other clips, cut to ref_frames latent steps
            assert slot is None or slot.latent.shape[1:] == (CV, ref_frames, H, W)
            if slot is not None:
                assert torch.allclose(
                    slot.latent[0, 0, :, 0, 0] % 1, torch.arange(ref_frames) / 10 * slot.present[0]
                )
        for slot in refs.audios:
            assert slot is None or slot.latent.shape[1:] == (CA, ref_frames * M)
        assert len(refs.images) <= 9 and len(refs.videos) <= 3 and len(refs.audios) <= 3
    # Every slot count is drawn, absence included, up to the 3 distinct other shots.
    assert counts["images"] == set(range(4)) and counts["videos"] == set(range(4))


def test_reference_limits_and_probabilities(store):
    gen = torch.Generator().manual_seed(1)
    never = _builder(store, reference_probability=0.0, i2v_probability=0.0)
    assert all(never.build([0, 1], gen).references is None for _ in range(10))
    small = _builder(store, max_refs=(2, 1, 0), reference_probability=1.0)
    no_i2v = _builder(store, reference_probability=1.0, own_frame_probability=0.0)
    for seed in range(20):
        refs = small.build([0, 1], torch.Generator().manual_seed(seed)).references
        if refs is not None:  # the model's limits cap the data's 9/3/3
            assert len(refs.images) <= 2 and len(refs.videos) <= 1 and refs.audios == []
        refs = no_i2v.build([0], torch.Generator().manual_seed(seed)).references
        assert refs is None or len(refs.images) < 9  # the I2V slot never filled


def test_batches_are_a_function_of_the_seed(store):
    builder = _builder(store, reference_probability=0.7)

    def picks(seed: int) -> list:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(6):
            refs = builder.build([0, 1, 3], gen).references
            slots = [] if refs is None else refs.images + refs.videos + refs.audios
            out.append(
                [None if s is None else (s.latent.tolist(), s.present.tolist()) for s in slots]
            )
        return out

    assert picks(5) == picks(5)
    assert picks(5) != picks(6)


def test_the_sft_subset_is_the_top_fraction_but_at_least_one_global_batch():
    rows = [
        ClipRow(f"c{i}", "s", "u", 0.0, 17, 17, "t", True, q, 0)
        for i, q in enumerate([0.9, 0.1, 0.5, 0.3])
    ]
    assert [r.clip_id for r in sft_subset(rows, 0.25)] == ["c0"]
    assert sorted(r.clip_id for r in sft_subset(rows, 0.5)) == ["c0", "c2"]
    # a batch of 3 takes the three best, not the top quarter's one clip
    assert sorted(r.clip_id for r in sft_subset(rows, 0.25, min_rows=3)) == ["c0", "c2", "c3"]
    assert len(sft_subset(rows, 0.25, min_rows=9)) == 4  # no more than there are


def test_standout_weighting_lifts_the_object_positions_of_the_video_loss():
    """dit_loss's ``standout_weight``: latent positions far from their frame's median
    latent weigh 1 + w * distance; the backdrop keeps 1, and 0 is the plain mean. An
    error on the object alone then costs more than the same error on a backdrop
    position."""
    from pipelines.train.loop import latent_standout, weighted_mean

    x0 = torch.zeros(1, 4, 2, 4, 4)  # (B, Cv, T, h, w): a flat backdrop...
    x0[0, 1, :, 1, 2] = 0.5  # ...and one object position, off by 0.5 in one channel
    weight = latent_standout(x0, 10.0)
    assert weight.shape == (1, 1, 2, 4, 4)
    assert weight[0, 0, 0, 1, 2] == pytest.approx(6.0) and weight[0, 0, 0, 0, 0] == 1.0
    assert latent_standout(x0, 0.0) is None

    on_object, on_backdrop = torch.zeros_like(x0), torch.zeros_like(x0)
    on_object[0, 0, :, 1, 2] = 1.0
    on_backdrop[0, 0, :, 3, 3] = 1.0
    plain = [weighted_mean(e, None).item() for e in (on_object, on_backdrop)]
    assert plain[0] == plain[1] == pytest.approx(2 / x0.numel())
    lifted = [weighted_mean(e, weight).item() for e in (on_object, on_backdrop)]
    assert lifted[0] > 5 * lifted[1]
