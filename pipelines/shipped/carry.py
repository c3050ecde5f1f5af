"""What the bare GPU machine needs to run every training stage, packed under 64 MiB.

The lent machine has PyTorch but no PyAV (our clip decoder), no text-encoder weights
and no Ray, and takes at most 64 MiB of files. A carry folder holds:

- ``clips/<clip_id>.mp4``: the curated clips of the chosen manifests (kept, train
  and val splits), cut to the first ``frames`` frames (the one frame bucket the
  stages train on) and transcoded once (H.264 CRF 20, AAC 64 kb/s) so that about
  600 fit; the curation flow chose and captioned them, this only shortens them;
- ``clips.parquet``: those manifests' rows (same schema and version metadata),
  ``clip_uri`` relative to the carry folder and ``end_s`` at the cut;
- ``texts.safetensors``: the frozen text encoder's token embeddings (fp16) of every
  conditioning text, keyed by the text (:class:`TableTextEncoder` serves them);
- ``av-*.whl``: PyAV's wheel (abi3, any CPython >= 3.11), installed there first.

:func:`unpack` installs the wheel, rewrites ``clip_uri`` to absolute paths and
swaps the pipeline's text encoder for the table, so :mod:`pipelines.train` runs
``vae -> pretrain -> sft`` there unchanged.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import torch

CARRY_SCHEMA_VERSION = 1
TEXTS_NAME = "texts.safetensors"
MANIFEST_NAME = "clips.parquet"
INFO_NAME = "carry.json"


class CarryError(RuntimeError):
    """A carry folder is incomplete, or a text is missing from its table."""


def pack(
    manifests: list[str],
    out_dir: str,
    wheel: str,
    frames: int = 33,
    max_clip_bytes: int = 16 * 1024 * 1024,
    progress=None,
) -> dict:
    """Write the carry folder; returns a summary (clip counts, bytes)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from core.media import AVClip, read_clip, write_mp4
    from model.text_encoder import FrozenTextEncoder
    from pipelines.train.data import conditioning_text

    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    tables = [pq.read_table(m) for m in manifests]
    schema = tables[0].schema
    rows = [r for t in tables for r in t.to_pylist() if r["keep"]]
    # Held-out clips first (the vae stage measures PSNR on them), then training
    # clips in a seeded order until the byte budget is spent.
    rng = np.random.default_rng(0)
    val = [r for r in rows if r.get("split") == "val"]
    train = [r for r in rows if r.get("split") != "val"]
    train = [train[i] for i in rng.permutation(len(train))]
    written, used, skipped = [], 0, 0
    for row in val + train:
        rel = f"clips/{row['clip_id']}.mp4"
        done = os.path.join(out_dir, rel)
        clip = read_clip(done if os.path.exists(done) else row["clip_uri"], require_audio=False)
        n = min(clip.num_frames, frames + 2)  # 2 spare: the cut must still cover a bucket
        if n < frames:
            skipped += 1
            continue
        if not os.path.exists(done):  # a repack keeps clips already cut
            samples = int(round(n / clip.fps * clip.sample_rate))
            cut = AVClip(
                frames=clip.frames[:n], fps=clip.fps, audio=clip.audio[:, :samples],
                sample_rate=clip.sample_rate,
            )  # fmt: skip
            write_mp4(done, cut, crf=20, audio_bitrate=64_000, aac_coder="fast")
        used += os.path.getsize(os.path.join(out_dir, rel))
        written.append({**row, "clip_uri": rel, "end_s": row["start_s"] + n / clip.fps})
        if progress is not None:
            progress(len(written), used)
        if used >= max_clip_bytes:
            break
    table = pa.Table.from_pylist(written, schema=schema)
    pq.write_table(table, os.path.join(out_dir, MANIFEST_NAME))

    encoder = FrozenTextEncoder()
    texts = sorted({conditioning_text(r["caption"], r["transcript"]) for r in written} - {""})
    table_tensors = {}
    for i in range(0, len(texts), 64):
        chunk = texts[i : i + 64]
        tokens, mask = encoder.encode(chunk)
        for text, tok, m in zip(chunk, tokens, mask, strict=True):
            table_tensors[text] = tok[m].to(torch.float16).contiguous()
    save_file(table_tensors, os.path.join(out_dir, TEXTS_NAME))
    shutil.copyfile(wheel, os.path.join(out_dir, os.path.basename(wheel)))
    info = {
        "schema_version": CARRY_SCHEMA_VERSION,
        "manifests": manifests,
        "frames": frames,
        "clips": len(written),
        "val_clips": sum(1 for r in written if r.get("split") == "val"),
        "skipped_short": skipped,
        "kept_rows_available": len(rows),
        "clip_bytes": used,
        "texts": len(table_tensors),
        "text_encoder": {"model_path": encoder.model_path, "max_tokens": encoder.max_tokens},
    }
    with open(os.path.join(out_dir, INFO_NAME), "w") as f:
        json.dump(info, f, indent=1)
    info["bytes"] = {
        name: os.path.getsize(os.path.join(out_dir, name))
        for name in os.listdir(out_dir)
        if os.path.isfile(os.path.join(out_dir, name))
    }
    return info


def install_pyav(carry_dir: str) -> None:
    """Make ``import av`` work: already there, else the carried wheel (pip, or unzipped)."""
    try:
        import av  # noqa: F401

        return
    except ImportError:
        pass
    wheels = glob.glob(os.path.join(carry_dir, "av-*.whl"))
    if not wheels:
        raise CarryError(f"{carry_dir}: no PyAV wheel and no PyAV installed")
    import importlib

    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[0]],
        capture_output=True,
        text=True,
    )
    importlib.invalidate_caches()
    try:
        import av  # noqa: F401
    except ImportError:  # no pip, or a site-packages not on the path: a wheel is a zip
        import zipfile

        target = os.path.join(carry_dir, "_site")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(target)
        sys.path.insert(0, target)
        importlib.invalidate_caches()
        import av  # noqa: F401


class TableTextEncoder:
    """A :class:`model.text_encoder.FrozenTextEncoder` that serves precomputed embeddings."""

    table: dict[str, torch.Tensor] = {}

    def __init__(self, model_path: str = "", max_tokens: int = 32, **_):
        self.model_path, self.max_tokens = "table", max_tokens
        self.device = torch.device("cpu")
        self._cache = OrderedDict((k, v.float()) for k, v in self.table.items())
        self.embed_dim = next(iter(self._cache.values())).shape[1]

    def embed_tokens(self, prompt: str) -> torch.Tensor:
        hit = self._cache.get(prompt)
        if hit is None:
            raise CarryError(f"text not in the carried embedding table: {prompt!r}")
        return hit

    def encode(self, prompts: list[str]):
        rows = [self.embed_tokens(p) for p in prompts]
        length = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), length, self.embed_dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return out, mask


def use_text_table(carry_dir: str) -> None:
    """Pipelines built from now on embed text from the carried table."""
    use_text_table_file(os.path.join(carry_dir, TEXTS_NAME))


def use_text_table_file(path: str) -> None:
    """Pipelines built from now on embed text from the table at ``path``."""
    from safetensors.torch import load_file

    import model.pipeline

    TableTextEncoder.table = load_file(path)
    model.pipeline.FrozenTextEncoder = TableTextEncoder


def unpack(carry_dir: str, work_dir: str) -> str:
    """Install PyAV, point the manifest at the carried clips, use the text table.

    Returns the manifest to train on (``data.curated_uri``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    carry_dir = os.path.abspath(carry_dir)
    for name in (MANIFEST_NAME, TEXTS_NAME, INFO_NAME):
        if not os.path.isfile(os.path.join(carry_dir, name)):
            raise CarryError(f"{carry_dir}: {name} missing")
    install_pyav(carry_dir)
    table = pq.read_table(os.path.join(carry_dir, MANIFEST_NAME))
    rows = table.to_pylist()
    for row in rows:
        row["clip_uri"] = os.path.join(carry_dir, row["clip_uri"])
        if not os.path.isfile(row["clip_uri"]):
            raise CarryError(f"carried clip missing: {row['clip_uri']}")
    os.makedirs(work_dir, exist_ok=True)
    manifest = os.path.join(work_dir, MANIFEST_NAME)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), manifest)
    use_text_table(carry_dir)
    return manifest


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Pack a carry folder for the GPU job.")
    parser.add_argument("--manifest", action="append", required=True, help="clips.parquet")
    parser.add_argument("--out", required=True)
    parser.add_argument("--wheel", required=True, help="PyAV wheel (abi3)")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--max-clip-mib", type=float, default=16.0)
    args = parser.parse_args(argv)

    def progress(n: int, used: int) -> None:
        if n % 50 == 0:
            print(f"{n} clips, {used / 2**20:.1f} MiB", flush=True)

    info = pack(
        args.manifest, args.out, args.wheel, args.frames, int(args.max_clip_mib * 2**20), progress
    )
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
