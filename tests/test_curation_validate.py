"""Validation: each kind of bad input is quarantined with a clear reason."""

from __future__ import annotations

import pytest

from core import media
from core.sample_media import (
    ACCEPTED_BY_DEFAULT,
    EXPECTED_REASON,
    make_bad_inputs,
    write_good,
)
from curation.validate import ValidateConfig, ValidateStage


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, str]:
    return make_bad_inputs(str(tmp_path_factory.mktemp("bad")))


def test_each_bad_input_is_quarantined_with_its_reason(bad_inputs):
    stage = ValidateStage()
    for kind, path in bad_inputs.items():
        record = stage(path)
        if kind in ACCEPTED_BY_DEFAULT:
            assert record.__class__.__name__ == "SourceRecord", kind
            continue
        assert record.__class__.__name__ == "QuarantineRecord", kind
        assert EXPECTED_REASON[kind] in record.reason, (kind, record.reason)
        record.uri.encode("utf-8")  # display form is always valid UTF-8
    assert set(EXPECTED_REASON) | set(ACCEPTED_BY_DEFAULT) == set(bad_inputs)


def test_video_only_and_vfr_are_accepted_unless_switched_off(bad_inputs):
    video_only = ValidateStage()(bad_inputs["no_audio"])
    assert not video_only.has_audio and video_only.audio_stream == -1
    vfr = ValidateStage()(bad_inputs["variable_frame_rate"])
    assert vfr.variable_frame_rate and vfr.has_audio
    for kind, (field, value, reason) in ACCEPTED_BY_DEFAULT.items():
        strict = ValidateStage(ValidateConfig(**{field: value}))
        record = strict(bad_inputs[kind])
        assert record.__class__.__name__ == "QuarantineRecord", kind
        assert reason in record.reason


def test_good_input_passes_and_reports_its_streams(tmp_path):
    path = write_good(str(tmp_path / "good.mp4"))
    record = ValidateStage()(path)
    assert record.__class__.__name__ == "SourceRecord"
    assert (record.width, record.height, record.fps) == (128, 96, 24.0)
    assert record.audio_rate == 48000 and record.frame_count == 72
    assert not media.probe_media(path).variable_frame_rate


def test_limits_are_configurable(tmp_path):
    path = write_good(str(tmp_path / "good.mp4"))
    strict = ValidateStage(ValidateConfig(max_pixels=100 * 90, min_duration_s=5.0))
    assert "exceeds the limit" in strict(path).reason
    assert "below 5.0 s" in ValidateStage(ValidateConfig(min_duration_s=5.0))(path).reason


def test_variable_frame_rate_detected(bad_inputs):
    assert media.probe_media(bad_inputs["variable_frame_rate"]).variable_frame_rate
