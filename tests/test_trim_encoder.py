"""A trimmed text encoder keeps the embeddings of every text its vocabulary covers."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from model.text_encoder import TEXT_ENCODER_ENV, FrozenTextEncoder, default_model_path
from pipelines.shipped.trim_encoder import TRIM_INFO, code_literals, coverage, trim

COVERED = ["a red circle bounces on a beige floor", "two blue squares slide left"]


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    out = tmp_path_factory.mktemp("trimmed") / "encoder"
    info = trim(default_model_path(), str(out), COVERED, keep_top=100)
    return out, info


def test_covered_texts_keep_their_tokens_and_embeddings(trimmed, monkeypatch, caplog):
    out, info = trimmed
    assert info["kept_vocab"] < 400 < info["original_vocab"]
    assert json.loads((out / TRIM_INFO).read_text())["kept_vocab"] == info["kept_vocab"]
    assert coverage(default_model_path(), str(out), COVERED) == []
    # a word none of whose pieces were kept is split differently (here: [UNK])
    assert coverage(default_model_path(), str(out), ["a xylophone"]) == ["a xylophone"]

    full = FrozenTextEncoder()
    monkeypatch.setenv(TEXT_ENCODER_ENV, str(out))
    small = FrozenTextEncoder()  # the environment variable names the copy
    assert small.model_path == str(out) and small.model.dtype == torch.float32
    for text in COVERED:
        a, b = full.embed_tokens(text), small.embed_tokens(text)
        assert a.shape == b.shape
        assert ((a - b).norm() / a.norm()).item() < 3e-3  # float16 storage
    with caplog.at_level(logging.WARNING, logger="model.text_encoder"):
        small.embed_tokens(COVERED[0])
        assert not caplog.records
        small.encode(["a xylophone"])  # a word the copy cannot spell is said, once
        small.embed_tokens("a xylophone")
    assert [r.getMessage().endswith("'a xylophone'") for r in caplog.records] == [True]
    other = full.embed_tokens("a red square bounces on a beige floor")
    assert ((other - small.embed_tokens(COVERED[0])).norm() / other.norm()).item() > 3e-2


def test_code_literals_reach_caption_words(tmp_path):
    (tmp_path / "grammar.py").write_text('COLOURS = ("teal", f"dark {1}")\n# "comment"\n')
    assert set(code_literals([str(tmp_path)])) == {"teal", "dark "}


def test_a_missing_encoder_says_how_to_name_one(monkeypatch, tmp_path):
    monkeypatch.setenv(TEXT_ENCODER_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="absent"):
        FrozenTextEncoder()
