"""Clip captions through pluggable backends that share one output schema.

Every backend fills the same three fields of a :class:`ClipRecord`:
``caption`` (text), ``caption_backend`` (``"sidecar"``, ``"openai"``,
``"transformers"``) and ``caption_model`` (the served model's name or the local
model directory's name; empty for the sidecar).

- ``sidecar``: captions that ship with the data (``NAME.json`` beside
  ``NAME.mp4``, the synthetic world's ground truth); a clip gets the caption of
  the sidecar shot its time range overlaps most.
- ``openai``: any OpenAI-compatible chat/completions endpoint that accepts image
  parts (vLLM serving Qwen2.5-VL, ...), sent the clip's keyframes.
- ``transformers``: a local vision-language model loaded from a directory.
- ``auto`` (the default): the sidecar when the source has one, else the model
  backend the config names (``model`` set: openai; ``model_path`` set:
  transformers), else none: the clip is kept with an empty caption and
  ``caption_verdict = "caption_missing"``.

A model backend that fails is retried (``retries``, with backoff); a clip whose
caption still fails gets ``caption_verdict = "caption_failed"`` and the error,
never a failed source. After ``max_consecutive_failures`` in a row the backend is
taken as down for the rest of the source (no more minute-long timeouts per clip).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import posixpath
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core import media, storage
from curation.records import ClipRecord
from curation.stage import Resources, SourceContext, Stage

DEFAULT_PROMPT = (
    "Describe this video clip in one short sentence: the objects, their colors and what they do."
)
BACKENDS = ("auto", "sidecar", "openai", "transformers")


class CaptionError(RuntimeError):
    """A caption backend failed (unreachable endpoint, missing model, bad reply)."""


class CaptionBackend(Protocol):
    name: str
    model: str

    def caption(self, clip: ClipRecord, keyframes: list[np.ndarray]) -> str: ...


@dataclass(frozen=True)
class CaptionConfig:
    backend: str = "auto"
    # openai
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # read from the environment, never stored
    timeout_s: float = 60.0
    # transformers
    model_path: str = ""
    # both model backends
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 48
    num_keyframes: int = 1
    keyframe_width: int = 448  # keyframes for a model are decoded at this width
    retries: int = 2  # extra attempts per clip when a model backend fails
    retry_backoff_s: float = 1.0
    max_consecutive_failures: int = 3

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"caption backend must be one of {BACKENDS}, not {self.backend!r}")


def sidecar_uri(source_uri: str) -> str:
    base, _ = (
        posixpath.splitext(source_uri) if "://" in source_uri else os.path.splitext(source_uri)
    )
    return base + ".json"


class SidecarCaptioner:
    """Captions from the JSON sidecar beside each source (read once per source)."""

    name = "sidecar"
    model = ""

    def __init__(self) -> None:
        self._cache: dict[str, list[dict[str, Any]]] = {}

    def shots_of(self, source_uri: str) -> list[dict[str, Any]]:
        if source_uri not in self._cache:
            uri = sidecar_uri(source_uri)
            try:
                data = storage.read_json(uri)
            except (storage.StorageError, FileNotFoundError) as err:
                raise CaptionError(f"{uri}: no caption sidecar for {source_uri}") from err
            except json.JSONDecodeError as err:
                raise CaptionError(f"{uri}: sidecar is not valid JSON ({err})") from err
            shots = data.get("shots") if isinstance(data, dict) else None
            if not isinstance(shots, list):
                raise CaptionError(f"{uri}: sidecar has no 'shots' list")
            self._cache[source_uri] = shots
        return self._cache[source_uri]

    def caption(self, clip: ClipRecord, keyframes: list[np.ndarray]) -> str:
        best, best_overlap = None, 0.0
        for shot in self.shots_of(clip.source_uri):
            overlap = min(clip.end_s, float(shot["end_s"])) - max(
                clip.start_s, float(shot["start_s"])
            )
            if overlap > best_overlap:
                best, best_overlap = shot, overlap
        if best is None:
            raise CaptionError(
                f"{sidecar_uri(clip.source_uri)}: no shot overlaps {clip.start_s:.3f}-{clip.end_s:.3f} s"
            )
        return str(best.get("caption", ""))


def encode_png_data_url(frame: np.ndarray) -> str:
    """``frame``: (H, W, 3) uint8 RGB -> ``data:image/png;base64,...``."""
    import cv2

    ok, png = cv2.imencode(".png", np.ascontiguousarray(frame[..., ::-1]))
    if not ok:
        raise CaptionError("could not encode a keyframe as PNG")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")


class OpenAICaptioner:
    """POSTs keyframes to ``{base_url}/chat/completions`` (OpenAI's vision message format)."""

    name = "openai"

    def __init__(self, config: CaptionConfig):
        if not config.model:
            raise ValueError("the openai caption backend needs a model name")
        self.config = config
        self.model = config.model
        self.url = config.base_url.rstrip("/") + "/chat/completions"

    def request_body(self, keyframes: list[np.ndarray]) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": self.config.prompt}]
        content += [
            {"type": "image_url", "image_url": {"url": encode_png_data_url(f)}} for f in keyframes
        ]
        return {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.config.max_new_tokens,
            "temperature": 0.0,
        }

    def caption(self, clip: ClipRecord, keyframes: list[np.ndarray]) -> str:
        body = json.dumps(self.request_body(keyframes)).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as reply:
                payload = json.loads(reply.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300]
            raise CaptionError(f"{self.url}: HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise CaptionError(f"{self.url}: unreachable ({err})") from err
        except json.JSONDecodeError as err:
            raise CaptionError(f"{self.url}: reply is not JSON ({err})") from err
        try:
            text = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise CaptionError(f"{self.url}: reply has no choices[0].message.content") from err
        if isinstance(text, list):  # some servers return content parts
            text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
        return str(text).strip()


_MODEL_CACHE: dict[str, Any] = {}
_MODEL_LOCK = threading.Lock()


class TransformersCaptioner:
    """A local image-to-text model (any ``AutoModelForImageTextToText`` or
    ``AutoModelForVision2Seq`` checkpoint directory), loaded once per process."""

    name = "transformers"

    def __init__(self, config: CaptionConfig):
        if not config.model_path or not os.path.isdir(config.model_path):
            raise CaptionError(
                f"transformers caption model directory not found: {config.model_path!r}"
            )
        self.config = config
        self.model = os.path.basename(os.path.normpath(config.model_path))

    def _load(self) -> tuple[Any, Any]:
        path = self.config.model_path
        with _MODEL_LOCK:
            if path not in _MODEL_CACHE:
                import transformers

                processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
                model = None
                errors = []
                for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
                    auto = getattr(transformers, auto_name, None)
                    if auto is None:
                        continue
                    try:
                        model = auto.from_pretrained(path, local_files_only=True)
                        break
                    except (ValueError, KeyError, OSError) as err:
                        errors.append(f"{auto_name}: {err}")
                if model is None:
                    raise CaptionError(f"{path}: not an image-to-text model ({'; '.join(errors)})")
                model.eval()
                _MODEL_CACHE[path] = (processor, model)
        return _MODEL_CACHE[path]

    def caption(self, clip: ClipRecord, keyframes: list[np.ndarray]) -> str:
        import torch
        from PIL import Image

        processor, model = self._load()
        image = Image.fromarray(keyframes[len(keyframes) // 2])
        try:
            inputs = processor(images=image, text=self.config.prompt, return_tensors="pt")
        except (TypeError, ValueError):
            inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False
            )
        decoder = getattr(processor, "tokenizer", processor)
        text = decoder.batch_decode(out, skip_special_tokens=True)[0]
        # Conditional captioners and decoder-only VLMs echo the prompt (normalised
        # by their tokenizer, e.g. lower-cased) before the continuation.
        if "input_ids" in inputs:
            echoed = decoder.decode(inputs["input_ids"][0], skip_special_tokens=True)
            if echoed and text.startswith(echoed):
                text = text[len(echoed) :]
        return text.strip()


def make_backend(config: CaptionConfig) -> CaptionBackend:
    if config.backend == "sidecar":
        return SidecarCaptioner()
    if config.backend == "openai":
        return OpenAICaptioner(config)
    return TransformersCaptioner(config)


def model_backend_of(config: CaptionConfig) -> str:
    """The model backend ``auto`` falls back to: "openai", "transformers" or ""."""
    if config.backend in ("openai", "transformers"):
        return config.backend
    if config.backend == "auto":
        if config.model:
            return "openai"
        if config.model_path:
            return "transformers"
    return ""


def keyframes_of(frames: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` frames evenly inside the clip (centres of equal segments)."""
    t = frames.shape[0]
    return [frames[min(t - 1, int((i + 0.5) * t / count))] for i in range(max(1, count))]


def keyframe_indices(start: int, end: int, count: int) -> list[int]:
    t = end - start
    return [start + min(t - 1, int((i + 0.5) * t / count)) for i in range(max(1, count))]


class CaptionStage(Stage):
    """Fills ``caption`` / ``caption_backend`` / ``caption_verdict`` of the window's clip."""

    name = "captions"
    version = "2"
    kind = "clip"

    def __init__(self, config: CaptionConfig | None = None):
        self.config = config or CaptionConfig()
        self.model_backend = model_backend_of(self.config)
        self._sidecar = SidecarCaptioner()
        self._model: CaptionBackend | None = None
        self._model_error = ""
        self._source = ""
        self._use_sidecar = False
        self._failures = 0
        if self.config.backend in ("openai", "transformers"):
            # Named explicitly: a bad configuration is an error now, not per clip.
            self._model = make_backend(self.config)

    @property
    def resources(self) -> Resources:
        # A local VLM computes here; the sidecar reads JSON and the openai backend
        # waits on a remote server, so only the transformers backend asks for more.
        return Resources(cpus=2 if self.model_backend == "transformers" else 1)

    def setup(self) -> None:
        if self.model_backend and self._model is None and not self._model_error:
            try:
                cfg = dataclasses.replace(self.config, backend=self.model_backend)
                self._model = make_backend(cfg)
            except (CaptionError, ValueError) as err:
                self._model_error = f"{type(err).__name__}: {err}"

    def _start_source(self, source_uri: str) -> None:
        self._source = source_uri
        self._failures = 0
        if self.config.backend == "sidecar":
            self._use_sidecar = True
        elif self.config.backend == "auto":
            try:
                self._use_sidecar = storage.exists(sidecar_uri(source_uri))
            except (OSError, ValueError):
                self._use_sidecar = False
        else:
            self._use_sidecar = False

    def process(self, ctx: SourceContext) -> None:
        clip = ctx.window.clip
        if clip.source_uri != self._source:
            self._start_source(clip.source_uri)
        if self._use_sidecar:
            # A sidecar that is present but broken is a data error worth seeing:
            # it fails this clip's caption, not the source.
            try:
                self._fill(clip, self._sidecar.caption(clip, []), self._sidecar)
            except CaptionError as err:
                self._failed(clip, err)
            return
        if not self.model_backend:
            clip.caption, clip.caption_verdict = "", "caption_missing"
            return
        self.setup()
        if self._model is None:
            clip.caption, clip.caption_verdict = "", "caption_failed"
            clip.caption_error = self._model_error
            return
        if self._failures >= self.config.max_consecutive_failures:
            clip.caption, clip.caption_verdict = "", "caption_failed"
            clip.caption_error = (
                f"backend down: {self._failures} clips in a row failed; skipped for this source"
            )
            return
        src = ctx.source
        width = min(self.config.keyframe_width, clip.width)
        height = max(2, int(round(clip.height * width / clip.width / 2)) * 2)
        frames = []
        for index in keyframe_indices(clip.start_frame, clip.end_frame, self.config.num_keyframes):
            for frame in media.iter_display_frames(
                ctx.path,
                clip.fps,
                src.start_s,
                size=(width, height),
                start_s=index / clip.fps,
                end_s=(index + 1) / clip.fps,
                sample_aspect_ratio=src.sample_aspect_ratio,
            ):
                frames.append(frame.image)
        self.caption_frames(clip, frames)

    def caption_frames(self, clip: ClipRecord, keyframes: list[np.ndarray]) -> ClipRecord:
        """Caption ``clip`` with the model backend from its ``keyframes``, with retries."""
        self.setup()
        if self._model is None:
            raise CaptionError(self._model_error or "no model caption backend configured")
        last: Exception | None = None
        for attempt in range(self.config.retries + 1):
            try:
                text = self._model.caption(clip, keyframes)
            except CaptionError as err:
                last = err
                if attempt < self.config.retries:
                    time.sleep(self.config.retry_backoff_s * (2**attempt))
                continue
            self._failures = 0
            return self._fill(clip, text, self._model)
        self._failures += 1
        return self._failed(clip, last)

    def _fill(self, clip: ClipRecord, text: str, backend: CaptionBackend) -> ClipRecord:
        clip.caption = text
        clip.caption_backend = backend.name
        clip.caption_model = backend.model
        clip.caption_verdict = "captioned" if text else "caption_missing"
        clip.caption_error = ""
        return clip

    def _failed(self, clip: ClipRecord, err: Exception | None) -> ClipRecord:
        clip.caption = ""
        clip.caption_verdict = "caption_failed"
        clip.caption_error = f"{type(err).__name__}: {err}"[:500] if err else "failed"
        return clip

    def __call__(self, clip: ClipRecord, frames: np.ndarray) -> ClipRecord:
        """Caption one clip from its frames ((T, H, W, 3) uint8 RGB): the configured
        backend only (no fallback); for tests and tools."""
        if self.config.backend == "sidecar" or (
            self.config.backend == "auto" and not self.model_backend
        ):
            return self._fill(clip, self._sidecar.caption(clip, []), self._sidecar)
        self.setup()
        if self._model is None:
            raise CaptionError(self._model_error)
        keyframes = keyframes_of(frames, self.config.num_keyframes)
        clip.caption = self._model.caption(clip, keyframes)
        clip.caption_backend = self._model.name
        clip.caption_model = self._model.model
        clip.caption_verdict = "captioned" if clip.caption else "caption_missing"
        return clip
