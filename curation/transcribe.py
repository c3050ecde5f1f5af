"""The speech pass: WhisperX transcripts for every clip of a committed source.

Speech is model-bound and runs in its own worker process (the isolated WhisperX
env, see ``curation.speech``), so it is a separate pass after the decode-bound
stages: it reads each clip's audio back from the written MP4 (an AAC decode,
cheap next to the model), transcribes a source's clips in one batched request,
and commits ``OUT/work/speech/<source_id>/<key>/result.json`` plus a marker, so a
killed run resumes here too. The key names the source pass's fingerprint and
the speech settings: other clips or another model are transcribed afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from core import media, storage
from curation.records import SourceResult

RESULT_NAME = "result.json"
SPEECH_RATE = 16000


def speech_key(source_fingerprint: str, speech_config: dict[str, Any]) -> str:
    text = json.dumps(speech_config, sort_keys=True, default=str)
    return f"{source_fingerprint}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def speech_work_uri(out_uri: str, source_id: str, key: str = "") -> str:
    return storage.join(out_uri, "work", "speech", source_id, key or "default")


def load_speech(out_uri: str, source_id: str, key: str = "") -> dict[str, Any] | None:
    """``{"clips": {clip_id: fields}, "media_seconds": .., "compute_seconds": ..}`` or None."""
    work = speech_work_uri(out_uri, source_id, key)
    if not storage.is_committed(work):
        return None
    return storage.read_json(storage.join(work, RESULT_NAME))


class SourceTranscriber:
    """Runs a ``SpeechStage`` over one source's clips and commits the result."""

    def __init__(self, stage: Any, batch_size: int = 8):
        self.stage = stage  # curation.speech.SpeechStage (or anything with call_batch)
        self.batch_size = batch_size

    def __call__(self, result: SourceResult, out_uri: str, key: str = "") -> dict[str, Any]:
        done = load_speech(out_uri, result.source_id, key)
        if done is not None:
            return done
        clips = [c for c in result.clip_records() if c.has_audio]
        fields: dict[str, Any] = {}
        media_seconds = 0.0
        t0 = time.perf_counter()
        for i in range(0, len(clips), self.batch_size):
            batch = clips[i : i + self.batch_size]
            items = []
            for clip in batch:
                audio, rate = media.read_audio(clip.uri, sample_rate=SPEECH_RATE, channels=1)
                items.append((audio, rate))
                media_seconds += audio.shape[-1] / rate
            for clip, out in zip(batch, self.stage.call_batch(items), strict=True):
                fields[clip.clip_id] = out
        payload = {
            "source_id": result.source_id,
            "clips": fields,
            "media_seconds": media_seconds,
            "compute_seconds": time.perf_counter() - t0,
            "batch_size": self.batch_size,
        }
        work = speech_work_uri(out_uri, result.source_id, key)
        storage.write_json(storage.join(work, RESULT_NAME), payload)
        storage.write_marker(work, {"source_id": result.source_id, "clips": len(fields)})
        return payload


class SpeechActor:
    """Ray actor body: one WhisperX worker process, fed one source's clips per call."""

    def __init__(self, speech_config: dict[str, Any], batch_size: int, env: dict[str, str]):
        os.environ.update(env)
        from curation.speech import SpeechConfig, SpeechStage

        self.stage = SpeechStage(SpeechConfig(**speech_config))
        self.transcriber = SourceTranscriber(self.stage, batch_size)
        self.config_key = {
            "config": speech_config,
            "batch": batch_size,
            "stage": SpeechStage.version,
        }

    def close(self) -> None:
        """Stop the WhisperX worker process before the actor goes away."""
        self.stage.close()

    def run(self, result: dict[str, Any], out_uri: str) -> dict[str, Any]:
        source = SourceResult.from_dict(result)
        key = speech_key(source.fingerprint, self.config_key)
        return self.transcriber(source, out_uri, key)
