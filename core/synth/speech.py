"""Speech for the talking avatar, synthesised offline with espeak-ng.

Each word is synthesised on its own (``espeak-ng -w word.wav``), trimmed to its
audible span and concatenated with silent gaps, so the start and end time of every
word in the track is known exactly (to the sample). The mouth of the avatar then
follows the envelope of this very waveform.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass

import numpy as np

# Voices shipped with Debian's espeak-ng-data; "+f3" style suffixes are variants.
# en-029 (Caribbean) is left out: Whisper tiny.en misheard half its words, which
# would measure the recogniser's accent coverage rather than the pipeline.
VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+f2")
# What the avatar says: short grammatical sentences. Speech recognisers lean on
# grammar; random word lists would test the recogniser's language model, not the
# pipeline around it. No sentence names a colour, shape or number (nor "a"/"an"),
# so a caption quoting the transcript never confuses the caption parser.
SENTENCES: tuple[str, ...] = (
    "hello world",
    "good morning people",
    "thank you",
    "welcome to the future",
    "we make music today",
    "listen to the river",
    "the garden is quiet",
    "this is the video",
    "people travel today",
    "we dance in the garden",
    "listen carefully to the story",
    "the water is moving",
    "thank you for the music",
    "this story is simple",
    "good morning and welcome",
    "happy people dance today",
    "the light is moving",
    "we listen to the sound",
    "look out of the window",
    "this picture is simple",
)
ESPEAK_RATE = 22050
# Samples below this fraction of a word's peak at its ends count as silence.
TRIM_FRACTION = 0.02


class SpeechError(RuntimeError):
    """espeak-ng is missing or failed."""


@dataclass
class SpeechTrack:
    audio: np.ndarray  # (N,) float32 mono at sample_rate, peak 0.8
    sample_rate: int
    words: list[dict]  # {"word", "start_s", "end_s"} relative to the track start
    text: str


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


@functools.lru_cache(maxsize=512)
def _espeak_word(word: str, voice: str, speed_wpm: int, pitch: int) -> np.ndarray:
    """One word from espeak-ng as (N,) float32 at ESPEAK_RATE, trimmed to its audible span."""
    if not espeak_available():
        raise SpeechError(
            "espeak-ng is not installed (run infra/local/install_system_deps.sh); "
            "the talking_avatar scene needs it"
        )
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-p", str(pitch), "-w", tmp.name]
        done = subprocess.run(cmd + [word], capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise SpeechError(f"espeak-ng failed on {word!r}: {done.stderr.decode()[-300:]}")
        data = open(tmp.name, "rb").read()
    with wave.open(io.BytesIO(data)) as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise SpeechError("espeak-ng produced an unexpected WAV format")
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    if rate != ESPEAK_RATE:
        raise SpeechError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
    audio = samples.astype(np.float32) / 32768.0
    loud = np.nonzero(np.abs(audio) > TRIM_FRACTION * np.max(np.abs(audio)))[0]
    if loud.size == 0:
        raise SpeechError(f"espeak-ng produced silence for {word!r}")
    return audio[loud[0] : loud[-1] + 1]


def synthesize_sentence(
    words: list[str],
    sample_rate: int,
    rng: np.random.Generator,
    lead_in_s: float,
    voice: str,
    speed_wpm: int,
    pitch: int,
) -> SpeechTrack:
    """Speak ``words`` one by one with seeded gaps; word times are exact."""
    from scipy.signal import resample_poly

    g = np.gcd(sample_rate, ESPEAK_RATE)
    pieces: list[np.ndarray] = []
    timed: list[dict] = []
    cursor = int(round(lead_in_s * sample_rate))
    pieces.append(np.zeros(cursor, np.float32))
    for i, word in enumerate(words):
        raw = _espeak_word(word, voice, speed_wpm, pitch)
        audio = resample_poly(raw, sample_rate // g, ESPEAK_RATE // g).astype(np.float32)
        audio *= 0.8 / max(float(np.max(np.abs(audio))), 1e-6)
        # A resampled word can ring for a few samples past its ends; the recorded
        # span is the audible one of the resampled waveform.
        loud = np.nonzero(np.abs(audio) > TRIM_FRACTION * 0.8)[0]
        audio = audio[loud[0] : loud[-1] + 1]
        timed.append(
            {
                "word": word,
                "start_s": round(cursor / sample_rate, 6),
                "end_s": round((cursor + audio.shape[0]) / sample_rate, 6),
            }
        )
        pieces.append(audio)
        cursor += audio.shape[0]
        if i + 1 < len(words):
            gap = int(round(rng.uniform(0.08, 0.25) * sample_rate))
            pieces.append(np.zeros(gap, np.float32))
            cursor += gap
    return SpeechTrack(
        audio=np.concatenate(pieces),
        sample_rate=sample_rate,
        words=timed,
        text=" ".join(words),
    )


def envelope_at(track: SpeechTrack, times_s: np.ndarray, window_s: float) -> np.ndarray:
    """RMS envelope of the speech in a window centred on each time, normalised to peak 1."""
    n = track.audio.shape[0]
    half = max(int(round(window_s * track.sample_rate / 2)), 1)
    power = np.concatenate([[0.0], np.cumsum(track.audio.astype(np.float64) ** 2)])
    centres = np.round(np.asarray(times_s) * track.sample_rate).astype(np.int64)
    lo = np.clip(centres - half, 0, n)
    hi = np.clip(centres + half, 0, n)
    rms = np.sqrt((power[hi] - power[lo]) / np.maximum(hi - lo, 1))
    peak = float(np.max(rms)) if rms.size else 0.0
    return rms / peak if peak > 0 else rms
