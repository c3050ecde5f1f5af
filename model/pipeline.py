"""The bundle of networks behind ``generate()``: both VAEs, the DiT, the vocoder.

Also the conversion between :class:`core.media.AVClip` and model tensors, which is
where the time grids are enforced: frames are trimmed to ``1 + 4k``, and the
waveform is front-padded by ``4 - 1`` frames of silence (so audio latent group
``i`` covers exactly the frames of video latent ``i``, see :mod:`model.rope`) and
padded or trimmed to the length the audio latents cover.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import checkpoint
from model.audio_vae import AudioVAE, MelSpectrogram, NeuralVocoder
from model.checkpoint import (
    COMPONENTS,
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    check_matches,
    inspect_state,
    model_config,
    named_tensors,
    read_meta,
    save_state,
)
from model.configs import ModelConfig, get_config
from model.dit import DualBranchDiT, TextConditioning, is_new_key
from model.rope import audio_front_pad_samples
from model.text_encoder import FrozenTextEncoder
from model.video_vae import VideoVAE, frames_to_tensor, tensor_to_frames

if TYPE_CHECKING:  # core.media needs PyAV; the networks themselves do not
    from core.media import AVClip


class DuetPipeline(nn.Module):
    def __init__(self, cfg: ModelConfig, text_encoder: FrozenTextEncoder | None = None):
        super().__init__()
        self.config = cfg.validate()
        self.video_vae = VideoVAE(cfg.video_vae)
        self.audio_vae = AudioVAE(cfg.audio_vae, cfg.sample_rate, cfg.mel_hop_length)
        self.dit = DualBranchDiT(cfg)
        self.vocoder = NeuralVocoder(cfg.audio_vae)
        # Griffin-Lim until the neural vocoder has been trained (fit sets this).
        self.use_neural_vocoder = False
        self._text_encoder = text_encoder
        # Set on a Fast student (a ``distill`` stage's final checkpoint, ``extra.fast``):
        # its step counts and sampler; ``generate(quality="fast")`` needs it.
        self.fast: dict | None = None

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, text_encoder: FrozenTextEncoder | None = None):
        torch.manual_seed(seed)
        return cls(get_config(name), text_encoder)

    @classmethod
    def from_checkpoint(
        cls,
        uri: str,
        text_encoder: FrozenTextEncoder | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        pipeline = load_pipeline(uri, text_encoder, dtype=dtype, device=device)
        pipeline.fast = read_meta(uri).get("extra", {}).get("fast")
        return pipeline

    def save(self, uri: str, extra: dict | None = None, max_shard_bytes: int | None = None) -> None:
        save_pipeline(uri, self, extra, max_shard_bytes or DEFAULT_SHARD_BYTES)

    # -- text --------------------------------------------------------------------
    @property
    def text_encoder(self) -> FrozenTextEncoder:
        if self._text_encoder is None:
            self._text_encoder = FrozenTextEncoder(
                self.config.text.model_path, self.config.text.max_tokens
            )
        if self._text_encoder.embed_dim != self.config.text.embed_dim:
            raise ValueError(
                f"text encoder width {self._text_encoder.embed_dim} != config "
                f"text.embed_dim {self.config.text.embed_dim}"
            )
        return self._text_encoder

    def encode_text(self, prompts: list[str]) -> TextConditioning:
        tokens, mask = self.text_encoder.encode(prompts)
        device = self.device
        return TextConditioning(tokens.to(device), mask.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    # -- clip <-> tensors --------------------------------------------------------
    @property
    def audio_front_pad(self) -> int:
        c = self.config
        return audio_front_pad_samples(c.fps, c.sample_rate, c.video_vae.temporal_factor)

    def clip_to_tensors(self, clip: AVClip, num_frames: int | None = None):
        """AVClip -> video (3, 1+4k, H, W) in [-1, 1] and padded audio (2, N)."""
        return clip_tensors(clip, self.config, num_frames)

    @torch.no_grad()
    def encode_clip(self, clip: AVClip, num_frames: int | None = None):
        """-> normalised latents video (1, Cv, T', h, w), audio (1, Ca, Na)."""
        video, audio = self.clip_to_tensors(clip, num_frames)
        device = self.device
        return (
            self.video_vae.encode(video[None].to(device)),
            self.audio_vae.encode(audio[None].to(device)),
        )

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, Cv, 1, h, w) latent (an image is a one-frame video)."""
        x = frames_to_tensor(image[None])
        c = self.config
        if x.shape[2:] != (c.height, c.width):
            x = F.interpolate(x, size=(c.height, c.width), mode="bilinear", align_corners=False)
        return self.video_vae.encode(x[None].to(self.device))

    @torch.no_grad()
    def encode_video_frames(self, frames: np.ndarray) -> torch.Tensor:
        tf = self.config.video_vae.temporal_factor
        n = 1 + tf * ((frames.shape[0] - 1) // tf)
        x = frames_to_tensor(frames[:n])
        c = self.config
        if x.shape[2:] != (c.height, c.width):
            x = F.interpolate(x, size=(c.height, c.width), mode="bilinear", align_corners=False)
        return self.video_vae.encode(x[None].to(self.device))

    @torch.no_grad()
    def encode_audio_track(self, audio: np.ndarray) -> torch.Tensor:
        """(C, N) waveform at the model's rate -> (1, Ca, Na) latent (no front pad)."""
        wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if wav.dim() == 1:
            wav = wav[None]
        channels = self.config.audio_vae.audio_channels
        if wav.shape[0] < channels:
            wav = wav.repeat(channels, 1)
        wav = wav[:channels]
        spl = self.audio_vae.samples_per_latent
        n = max(spl, -(-wav.shape[1] // spl) * spl)
        wav = F.pad(wav, (0, n - wav.shape[1]))
        return self.audio_vae.encode(wav[None].to(self.device))

    @torch.no_grad()
    def decode_latents(
        self,
        video: torch.Tensor,  # (1, Cv, T', h, w) normalised
        audio: torch.Tensor,  # (1, Ca, Na) normalised
        num_frames: int | None = None,
        seed: int = 0,
    ) -> AVClip:
        from core.media import AVClip

        frames = self.video_vae.decode(video)[0]  # (3, T, H, W)
        if num_frames is not None:
            frames = frames[:, :num_frames]
        generator = torch.Generator().manual_seed(seed)
        vocoder = self.vocoder if self.use_neural_vocoder else None
        wav = self.audio_vae.decode(audio.float(), vocoder, generator)[0]  # (2, N)
        n_frames = frames.shape[1]
        n_samples = round(n_frames * self.config.sample_rate / self.config.fps)
        wav = wav[:, self.audio_front_pad : self.audio_front_pad + n_samples]
        return AVClip(
            frames=tensor_to_frames(frames),
            fps=float(self.config.fps),
            audio=wav.cpu().numpy().astype(np.float32),
            sample_rate=int(self.config.sample_rate),
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_breakdown(cfg: ModelConfig) -> list[tuple[str, int]]:
    """Trainable parameters per component, built on the meta device (no memory)."""
    with torch.device("meta"):
        pipe = DuetPipeline(cfg)
    dit = pipe.dit
    video_branch = sum(count_parameters(b.video) for b in dit.blocks)
    audio_branch = sum(count_parameters(b.audio) for b in dit.blocks)
    cross = sum(count_parameters(b.cross) for b in dit.blocks if b.cross is not None)
    embed_v = sum(
        count_parameters(m)
        for m in (dit.video_in, dit.time_v, dit.other_time_v, dit.text_v, dit.video_out)
    )
    embed_a = sum(
        count_parameters(m)
        for m in (dit.audio_in, dit.time_a, dit.other_time_a, dit.text_a, dit.audio_out)
    )
    rows = [
        ("video_vae.encoder", count_parameters(pipe.video_vae.encoder)),
        ("video_vae.decoder", count_parameters(pipe.video_vae.decoder)),
        ("audio_vae.encoder", count_parameters(pipe.audio_vae.encoder)),
        ("audio_vae.decoder", count_parameters(pipe.audio_vae.decoder)),
        ("vocoder (neural)", count_parameters(pipe.vocoder)),
        ("dit.video_blocks", video_branch),
        ("dit.audio_blocks", audio_branch),
        ("dit.cross_modal", cross),
        ("dit.video_embed+head", embed_v),
        ("dit.audio_embed+head", embed_a),
        ("dit.references+null_text", count_parameters(dit.references) + dit.null_text.numel()),
    ]
    total_dit = count_parameters(dit)
    if sum(n for name, n in rows if name.startswith("dit.")) != total_dit:
        raise RuntimeError("DiT parameter breakdown does not add up")
    return rows


def clip_tensors(clip: AVClip, c: ModelConfig, num_frames: int | None = None):
    """AVClip -> video (3, 1+4k, H, W) in [-1, 1] and padded audio (2, N) for config ``c``.

    A function of the config alone, so decoding workers need no network weights.
    """
    if not clip.fps > 0 or clip.num_frames == 0:
        raise ValueError(
            f"clip needs frames and a positive fps, got {clip.num_frames} @ {clip.fps}"
        )
    frames = clip.frames
    if abs(clip.fps - c.fps) > 1e-3:
        # Nearest-frame retiming to the model's rate (audio is untouched: same clock).
        n_out = max(1, int(clip.num_frames * c.fps / clip.fps))
        src = np.round(np.arange(n_out) * clip.fps / c.fps).astype(int)
        frames = frames[np.minimum(src, clip.num_frames - 1)]
    audio = np.asarray(clip.audio, dtype=np.float32)
    if clip.sample_rate != c.sample_rate:
        from core.media import resample_audio

        audio = resample_audio(audio, clip.sample_rate, c.sample_rate)
    tf = c.video_vae.temporal_factor
    if num_frames is None:
        num_frames = 1 + tf * ((frames.shape[0] - 1) // tf)
    if num_frames > frames.shape[0]:
        raise ValueError(f"clip has {frames.shape[0]} frames, {num_frames} requested")
    video = frames_to_tensor(frames[:num_frames])  # (3, T, H, W)
    if video.shape[2:] != (c.height, c.width):
        video = F.interpolate(video, size=(c.height, c.width), mode="bilinear", align_corners=False)
    return video, _prepare_audio(audio, c, num_frames)


def _prepare_audio(audio: np.ndarray, c: ModelConfig, num_frames: int) -> torch.Tensor:
    wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    if wav.dim() == 1:
        wav = wav[None]
    channels = c.audio_vae.audio_channels
    if wav.shape[0] < channels:
        wav = wav.repeat(channels // wav.shape[0] + 1, 1)
    wav = wav[:channels]
    n_latents = c.num_latent_frames(num_frames)
    total = c.audio_samples_for_latents(n_latents)
    front_pad = audio_front_pad_samples(c.fps, c.sample_rate, c.video_vae.temporal_factor)
    wav = F.pad(wav, (front_pad, 0))[:, :total]
    return F.pad(wav, (0, total - wav.shape[1]))


# -- checkpoints (model.checkpoint's files, this bundle's networks) ------------------


def save_pipeline(
    uri: str, pipeline, extra: dict | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    tensors = {}
    for name in COMPONENTS:
        for key, value in getattr(pipeline, name).state_dict().items():
            tensors[f"{name}.{key}"] = value
    meta = {
        "config": pipeline.config.to_dict(),
        "components": list(COMPONENTS),
        "use_neural_vocoder": bool(pipeline.use_neural_vocoder),
        "extra": extra or {},
    }
    save_state(uri, tensors, meta, max_shard_bytes)


def load_pipeline(
    uri: str,
    text_encoder=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """Build the pipeline on the meta device and assign the stored tensors.

    ``dtype`` casts the DiT's floating tensors (the VAEs and vocoder keep theirs);
    ``device`` places everything (default CPU).
    """
    specs, meta = inspect_state(uri)
    cfg = model_config(meta, uri)
    components = meta.get("components", list(COMPONENTS))
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise CheckpointError(f"{uri}: unknown component(s) {unknown}")
    with torch.device("meta"):
        pipeline = DuetPipeline(cfg, text_encoder)
    expected = {
        f"{name}.{k}": v for name in components for k, v in getattr(pipeline, name).state_dict().items()
    }  # fmt: skip
    # Keys newer than the checkpoint may be absent: the DiT's load hook gives them zeros.
    check_matches(
        specs, {k: v for k, v in expected.items() if k in specs or not is_new_key(k)}, uri
    )

    device = torch.device(device or "cpu")
    tensors = checkpoint.read_tensors(uri, meta, sorted({s.file for s in specs.values()}))
    for name in components:
        prefix = f"{name}."
        # ``dtype`` is the DiT's compute dtype; otherwise weights stored in half
        # precision (a bf16 shipped checkpoint) compute in fp32, as the networks'
        # inputs are fp32.
        cast = dtype if name == "dit" and dtype is not None else torch.float32
        state = {
            k[len(prefix) :]: _to(v, device, cast) for k, v in tensors.items() if k.startswith(prefix)
        }  # fmt: skip
        getattr(pipeline, name).load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (the mel analysis) are not stored: compute them again.
    a = cfg.audio_vae
    # .to(device): the filterbank is built from numpy, outside any device context.
    pipeline.audio_vae.mel = MelSpectrogram(
        cfg.sample_rate, a.n_fft, cfg.mel_hop_length, a.n_mels, a.mel_fmin
    ).to(device)
    left = [n for n, t in named_tensors(pipeline) if t.is_meta]
    if left:
        raise CheckpointError(f"{uri}: the checkpoint does not provide {left[:5]}")
    pipeline.use_neural_vocoder = bool(meta.get("use_neural_vocoder", False))
    pipeline.eval()
    return pipeline


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device)
