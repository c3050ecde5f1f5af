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
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core import storage
from curation.records import ClipRecord

DEFAULT_PROMPT = (
    "Describe this video clip in one short sentence: the objects, their colors and what they do."
)
BACKENDS = ("sidecar", "openai", "transformers")


class CaptionError(RuntimeError):
    """A caption backend failed (unreachable endpoint, missing model, bad reply)."""


class CaptionBackend(Protocol):
    name: str
    model: str

    def caption(self, clip: ClipRecord, keyframes: list[np.ndarray]) -> str: ...


@dataclass(frozen=True)
class CaptionConfig:
    backend: str = "sidecar"
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


def keyframes_of(frames: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` frames evenly inside the clip (centres of equal segments)."""
    t = frames.shape[0]
    return [frames[min(t - 1, int((i + 0.5) * t / count))] for i in range(max(1, count))]


class CaptionStage:
    """Fills ``caption`` / ``caption_backend`` of a clip from its frames."""

    name = "captions"

    def __init__(self, config: CaptionConfig | None = None):
        self.config = config or CaptionConfig()
        self.backend = make_backend(self.config)
        # A local VLM computes here; the sidecar reads JSON and the openai backend
        # waits on a remote server, so only the transformers backend asks for more.
        self.resources = {"num_cpus": 2 if self.config.backend == "transformers" else 1}

    def __call__(self, clip: ClipRecord, frames: np.ndarray) -> ClipRecord:
        """``frames``: (T, H, W, 3) uint8 RGB of the clip."""
        keyframes = keyframes_of(frames, self.config.num_keyframes)
        clip.caption = self.backend.caption(clip, keyframes)
        clip.caption_backend = self.backend.name
        clip.caption_model = self.backend.model
        return clip
