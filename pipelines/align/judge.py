"""A vision-language judge as the reward: P("yes") from an OpenAI-compatible endpoint.

RewardDance's reward is the probability a vision-language model answers "yes" to a
question about the sample. A team with such a model served behind an
OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI, a hosted API) uses
it with ``rlhf.reward_source = "judge"``: every candidate of a DanceGRPO group is
decoded, ``judge.max_frames`` evenly spaced frames go to the endpoint as PNG data
URLs with one yes/no question per head built from the prompt, and the head's reward
is ``P(yes) / (P(yes) + P(no))`` from the ``top_logprobs`` of the answer's first
token (asked for one token at temperature 0). The judge sees frames only, so by
default it is asked about ``adherence``, ``motion`` and ``visual``; the other heads
get weight 0 in DanceGRPO.

The endpoint is reached with :mod:`http.client` directly: no redirect is followed (a
3xx is an error naming its ``Location``), no proxy from the environment is used, the
URL must be ``http`` or ``https`` without credentials in it (the key comes from the
environment variable *named* by ``judge.api_key_env``, never from a config file), the
whole exchange has one deadline (``judge.timeout_s``) and the response is cut off at
``judge.max_response_bytes``. Any failure is a :class:`JudgeError` saying what the
endpoint did.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import time
import urllib.parse

import numpy as np
import torch

from pipelines.align.config import HEADS, JudgeConfig

# Questions per head; {prompt} is the generation prompt (quoted, one line).
QUESTIONS = {
    "adherence": (
        'These are frames of one video clip, in order. It was made for the description "{prompt}". '
        "Does it show what the description says (the objects, their colours and how many)? "
        "Answer yes or no."
    ),
    "motion": (
        'These are frames of one video clip, in order, made for the description "{prompt}". '
        "Do the objects move smoothly and plausibly from frame to frame, as described? "
        "Answer yes or no."
    ),
    "visual": (
        'These are frames of one video clip, made for the description "{prompt}". '
        "Are the frames clean and sharp, free of noise, smears and artefacts? Answer yes or no."
    ),
}
MAX_PROMPT_CHARS = 500


class JudgeError(RuntimeError):
    """The judge endpoint could not be asked or gave no usable answer."""


def question(head: str, prompt: str) -> str:
    if head not in QUESTIONS:
        raise JudgeError(
            f"the judge has no question for head {head!r} (it has {sorted(QUESTIONS)})"
        )
    # One line, bounded: the prompt is data inside the question, not more instructions.
    one_line = " ".join(prompt.split())[:MAX_PROMPT_CHARS].replace('"', "'")
    return QUESTIONS[head].format(prompt=one_line)


def parse_endpoint(base_url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of ``base_url``; refuses anything but plain
    http(s) URLs without credentials, query or fragment."""
    u = urllib.parse.urlsplit(base_url)
    if u.scheme not in ("http", "https"):
        raise JudgeError(f"judge.base_url must be http:// or https://, got {base_url!r}")
    if not u.hostname:
        raise JudgeError(f"judge.base_url has no host: {base_url!r}")
    if u.username or u.password:
        raise JudgeError("judge.base_url must not carry credentials (use judge.api_key_env)")
    if u.query or u.fragment:
        raise JudgeError(f"judge.base_url must not have a query or fragment: {base_url!r}")
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as err:
        raise JudgeError(f"judge.base_url has a bad port: {base_url!r}") from err
    return u.scheme, u.hostname, port, u.path.rstrip("/")


def frame_data_urls(frames: np.ndarray, max_frames: int) -> list[str]:
    """Up to ``max_frames`` evenly spaced frames of (T, H, W, 3) uint8 as PNG data URLs."""
    from PIL import Image

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise JudgeError(f"frames must be (T, H, W, 3) with T >= 1, got {frames.shape}")
    n = min(max_frames, frames.shape[0])
    picks = np.linspace(0, frames.shape[0] - 1, n).round().astype(int)
    urls = []
    for i in picks:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frames[i], dtype=np.uint8)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def p_yes(response: dict) -> float:
    """``P(yes) / (P(yes) + P(no))`` from the first token's ``top_logprobs`` (tokens
    compared stripped and lower-cased, so "Yes", " yes" and "YES" all count)."""
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
        top = first.get("top_logprobs") or [first]
        yes = no = 0.0
        for entry in top:
            word = str(entry["token"]).strip().lower()
            if word in ("yes", "no"):
                p = math.exp(float(entry["logprob"]))
                yes, no = (yes + p, no) if word == "yes" else (yes, no + p)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise JudgeError(
            "the judge's answer has no choices[0].logprobs.content[0].top_logprobs "
            f"(does the endpoint support logprobs?): {str(response)[:300]}"
        ) from err
    if yes + no <= 0:
        tokens = [e.get("token") for e in top if isinstance(e, dict)]
        raise JudgeError(f"neither 'yes' nor 'no' among the first token's top logprobs {tokens}")
    return yes / (yes + no)


class Judge:
    """One endpoint and model; :meth:`score` asks every configured head about a clip."""

    def __init__(self, cfg: JudgeConfig, environ=None):
        environ = os.environ if environ is None else environ
        self.cfg = cfg
        self.scheme, self.host, self.port, self.prefix = parse_endpoint(cfg.base_url)
        if not cfg.model:
            raise JudgeError("judge.model is empty: name the model the endpoint serves")
        unknown = [h for h in cfg.heads if h not in QUESTIONS]
        if unknown:
            raise JudgeError(f"the judge has no question for head(s) {unknown}")
        self.key = ""
        if cfg.api_key_env:
            self.key = environ.get(cfg.api_key_env, "")
            if not self.key:
                raise JudgeError(
                    f"judge.api_key_env names {cfg.api_key_env!r}, which is not set or empty"
                )

    def body(self, head: str, prompt: str, urls: list[str]) -> dict:
        content = [{"type": "text", "text": question(head, prompt)}]
        content += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        return {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.cfg.top_logprobs,
        }

    def post(self, body: dict) -> dict:
        """POST ``body`` to ``{base_url}/chat/completions`` under one deadline."""
        deadline = time.monotonic() + self.cfg.timeout_s
        where = f"{self.scheme}://{self.host}:{self.port}{self.prefix}/chat/completions"
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=self.cfg.timeout_s)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        try:
            conn.request("POST", self.prefix + "/chat/completions", json.dumps(body), headers)
            sock = conn.sock  # kept: the connection lets go of it once the answer is read
            resp = conn.getresponse()
            if 300 <= resp.status < 400:
                raise JudgeError(
                    f"{where}: HTTP {resp.status} redirect to {resp.getheader('Location')!r} "
                    "refused (point judge.base_url at the endpoint itself)"
                )
            data = self._read(resp, sock, deadline, where)
        except TimeoutError as err:
            raise JudgeError(f"{where}: no complete answer within {self.cfg.timeout_s} s") from err
        except OSError as err:
            raise JudgeError(f"{where}: {err}") from err
        finally:
            conn.close()
        if resp.status != 200:
            raise JudgeError(f"{where}: HTTP {resp.status}: {data[:300].decode(errors='replace')}")
        try:
            return json.loads(data)
        except ValueError as err:
            raise JudgeError(f"{where}: answer is not JSON: {data[:200]!r}") from err

    def _read(self, resp, sock, deadline: float, where: str) -> bytes:
        cap = self.cfg.max_response_bytes
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)  # the whole answer's deadline, not a per-read timeout
            chunk = resp.read1(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cap:
                raise JudgeError(f"{where}: answer over judge.max_response_bytes = {cap}")
            chunks.append(chunk)

    def score(self, prompt: str, frames: np.ndarray) -> dict[str, float]:
        """P(yes) per configured head for one clip's frames (T, H, W, 3) uint8."""
        urls = frame_data_urls(frames, self.cfg.max_frames)
        return {h: p_yes(self.post(self.body(h, prompt, urls))) for h in self.cfg.heads}


class JudgeReward:
    """DanceGRPO's reward from a :class:`Judge`: decodes each candidate's latents and
    returns (G, H) scores in :data:`HEADS` order, 0 for heads the judge is not asked."""

    def __init__(self, judge: Judge, pipeline, frames: int):
        self.judge = judge
        self.pipeline = pipeline
        self.frames = frames

    def to(self, device):  # the stage moves reward models; the judge has no weights
        return self

    def rewards(self, prompt: str, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        out = []
        for c in range(video.shape[0]):
            clip = self.pipeline.decode_latents(
                video[c : c + 1], audio[c : c + 1], self.frames, seed=c
            )
            scores = self.judge.score(prompt, clip.frames)
            out.append([scores.get(h, 0.0) for h in HEADS])
        return torch.tensor(out, dtype=torch.float32)
