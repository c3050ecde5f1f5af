"""What a bare, offline GPU host needs to run every training stage, packed under 64 MiB.

An offline GPU host may have PyTorch but no PyAV (our clip decoder), no text-encoder
weights and no Ray, and take only a small bundle of files (64 MiB by default). A carry folder holds:

- ``clips/<clip_id>.mp4``: the curated clips of the chosen manifests (kept, train
  and val splits), cut to the first ``frames`` frames (the one frame bucket the
  stages train on) and transcoded once (H.264 CRF 20, AAC 64 kb/s) so that about
  600 fit; the curation flow chose and captioned them, this only shortens them;
- ``clips.parquet``: those manifests' rows (same schema and version metadata),
  ``clip_uri`` relative to the carry folder and ``end_s`` at the cut;
- ``sequences/<sequence_id>.mp4`` and ``sequences.parquet`` (when the manifests have
  multi-shot sequences beside them, :mod:`pipelines.train.sequences`): whole
  sequences (every shot and cut kept), transcoded like the clips, within their own
  byte budget; ``sequence_uri`` relative to the carry folder;
- ``texts.safetensors``: the frozen text encoder's token embeddings (fp16) of every
  conditioning text, keyed by the text, and of every carried sequence's multi-shot
  plan (:meth:`FrozenTextEncoder.embed_segments`: one joint pass, so not rebuilt from
  the texts' rows), keyed by :func:`plan_key` (tokens) and :func:`plan_shots_key`
  (each token's shot id), for every shot count the sequence can be trimmed to
  (training drops shots that start past its frame bucket); :class:`TableTextEncoder`
  serves both;
- ``av-*.whl``: PyAV's wheel (abi3, any CPython >= 3.11), installed there first; or,
  packed with ``wheel_xz``, ``av-*.tar.xz``: the same wheel's files, xz-packed (36 MB
  -> 25 MB for PyAV 18: a wheel is deflated, and its bundled FFmpeg libraries pack
  far smaller with xz, which leaves room for more clips in a bounded carry).

:func:`unpack` installs the wheel, rewrites ``clip_uri`` and ``sequence_uri`` to
absolute paths and swaps the pipeline's text encoder for the table, so
:mod:`pipelines.train` runs ``vae -> pretrain -> sft`` there unchanged, multi-shot
steps included.

**Captions only** (``--captions-only``, ``carry.json`` ``"has_clips": false``): the same
manifest rows, chosen and ordered as a full carry chooses them (so the alignment
prompt sets are the same), and the text table, but no clips, sequences or PyAV. The
alignment stages (``rlhf`` with the rater as the reward or with a reward model
trained without corpus contrasts, ``distill``) and held-out scoring read captions
alone, so a bounded carry spends its bytes on text embeddings instead: thousands of
grammar captions (about 13 KB each) where a full carry has room for about a hundred.
Stages that read clips refuse it with the reason.

Versions (``carry.json`` ``schema_version``): 2 adds the sequences and the plan
entries; 3 may hold captions only; a version 1 carry still unpacks (single-shot
clips only: training warns that it has no sequences and takes no multi-shot steps);
a newer one is refused.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import torch

CARRY_SCHEMA_VERSION = 3
TEXTS_NAME = "texts.safetensors"
MANIFEST_NAME = "clips.parquet"
SEQUENCES_NAME = "sequences.parquet"  # beside the manifest: where training looks
INFO_NAME = "carry.json"
# Plan entries' keys start with a control character no caption holds, so a text's
# key can never be taken for a plan's.
_PLAN_PREFIX = "\x1fplan\x1f"
_PLAN_SHOTS_PREFIX = "\x1fplan-shots\x1f"


def _plan_json(segments, max_tokens: int) -> str:
    parts = [[s.text, int(s.shot), bool(s.trim)] for s in segments]
    return json.dumps([int(max_tokens), parts], ensure_ascii=False, separators=(",", ":"))


def plan_key(segments, max_tokens: int) -> str:
    """Table key of a plan's (L, D) tokens: its pieces and the token budget."""
    return _PLAN_PREFIX + _plan_json(segments, max_tokens)


def plan_shots_key(segments, max_tokens: int) -> str:
    """Table key of a plan's (L,) shot ids."""
    return _PLAN_SHOTS_PREFIX + _plan_json(segments, max_tokens)


def is_plan_key(key: str) -> bool:
    """Whether a table key holds a plan (its tokens or shot ids) rather than a text."""
    return key.startswith((_PLAN_PREFIX, _PLAN_SHOTS_PREFIX))


class CarryError(RuntimeError):
    """A carry folder is incomplete, or a text is missing from its table."""


def pack(
    manifests: list[str],
    out_dir: str,
    wheel: str,
    frames: int = 33,
    max_clip_bytes: int = 16 * 1024 * 1024,
    progress=None,
    max_sequence_bytes: int = 8 * 1024 * 1024,
    plan_tokens: tuple[int, ...] = (77,),
    wheel_xz: bool = False,
    captions_only: bool = False,
) -> dict:
    """Write the carry folder; returns a summary (clip counts, bytes). Plans are
    embedded for each budget of ``plan_tokens`` (the model's ``text.max_tokens``).
    ``captions_only``: the rows and texts without clips, sequences or ``wheel``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from core.media import AVClip, read_clip, write_mp4
    from model.reference_binding import all_binding_phrases
    from model.text_encoder import FrozenTextEncoder
    from pipelines.train.data import conditioning_text

    os.makedirs(out_dir if captions_only else os.path.join(out_dir, "clips"), exist_ok=True)
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
        if captions_only:  # the rows a full carry keeps, by the manifest's frame count
            if not row.get("fps"):
                raise CarryError(f"{row['clip_id']}: no fps in the manifest to count frames by")
            n = min(int((row["end_s"] - row["start_s"]) * row["fps"] + 1e-6), frames + 2)
            if n < frames:
                skipped += 1
                continue
            written.append({**row, "clip_uri": "", "end_s": row["start_s"] + n / row["fps"]})
            continue
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

    sequences, seq_bytes, seq_skipped = [], 0, 0
    if not captions_only:
        sequences, seq_bytes, seq_skipped = _pack_sequences(manifests, out_dir, max_sequence_bytes)

    encoder = FrozenTextEncoder()
    texts = sorted({conditioning_text(r["caption"], r["transcript"]) for r in written} - {""})
    # Training appends binding phrases ("@video2 motion") to captions of samples
    # with role references; the binder embeds them through this table too.
    texts += all_binding_phrases()
    table_tensors = {}
    for i in range(0, len(texts), 64):
        chunk = texts[i : i + 64]
        tokens, mask = encoder.encode(chunk)
        for text, tok, m in zip(chunk, tokens, mask, strict=True):
            table_tensors[text] = tok[m].to(torch.float16).contiguous()
    plans = 0
    for segments in _plans(sequences):
        for budget in plan_tokens:
            tok, shot = encoder.embed_segments(segments, budget)
            table_tensors[plan_key(segments, budget)] = tok.to(torch.float16).contiguous()
            table_tensors[plan_shots_key(segments, budget)] = shot.contiguous()
            plans += 1
    save_file(table_tensors, os.path.join(out_dir, TEXTS_NAME))
    if captions_only:
        pass  # no clips to decode, so no PyAV
    elif wheel_xz:
        _pack_wheel_xz(wheel, out_dir)
    else:
        shutil.copyfile(wheel, os.path.join(out_dir, os.path.basename(wheel)))
    info = {
        "schema_version": CARRY_SCHEMA_VERSION,
        "has_clips": not captions_only,
        "manifests": manifests,
        "frames": frames,
        "clips": len(written),
        "val_clips": sum(1 for r in written if r.get("split") == "val"),
        "skipped_short": skipped,
        "kept_rows_available": len(rows),
        "clip_bytes": used,
        "sequences": len(sequences),
        "sequences_skipped_budget": seq_skipped,
        "sequence_bytes": seq_bytes,
        "texts": len(texts),
        "plans": plans,
        "plan_tokens": list(plan_tokens),
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


def _pack_sequences(manifests: list[str], out_dir: str, budget: int) -> tuple[list[dict], int, int]:
    """The manifests' multi-shot sequences, whole and transcoded like the clips, in a
    seeded order until ``budget`` bytes; their rows go to ``sequences.parquet`` with
    ``sequence_uri`` relative. Returns (rows, bytes, sequences left out)."""
    import numpy as np

    from core import storage
    from core.media import read_clip, write_mp4
    from pipelines.train.sequences import read_records, table_uri, write_sequences

    records = []
    for manifest in manifests:
        uri = table_uri(manifest)
        if storage.exists(uri):
            records += read_records(uri)
    if not records:
        return [], 0, 0
    order = np.random.default_rng(0).permutation(len(records))
    written, used, skipped = [], 0, 0
    for rec in (records[i] for i in order):
        rel = f"sequences/{rec['sequence_id']}.mp4"
        done = os.path.join(out_dir, rel)
        if not os.path.exists(done):  # a repack keeps sequences already transcoded
            clip = read_clip(rec["sequence_uri"], require_audio=False)
            write_mp4(done, clip, crf=20, audio_bitrate=64_000, aac_coder="fast")
        size = os.path.getsize(done)
        if used + size > budget:  # a sequence is carried whole or not at all
            os.remove(done)
            skipped += 1
            continue
        used += size
        written.append({**rec, "sequence_uri": rel})
    written.sort(key=lambda r: r["sequence_id"])
    write_sequences(os.path.join(out_dir, SEQUENCES_NAME), written)
    return written, used, skipped


def _plans(records: list[dict]):
    """Every plan training can read from the rows: the whole sequence and each
    shorter run of its first shots (a frame bucket may leave the last shots out)."""
    from model.multishot import plan_segments
    from pipelines.train.sequences import MIN_SHOTS

    seen = set()
    for rec in records:
        captions, transitions = rec["shot_captions"], rec["transitions"]
        for k in range(MIN_SHOTS, len(captions) + 1):
            segments = plan_segments(rec.get("subject") or "", captions[:k], transitions[: k - 1])
            key = _plan_json(segments, 0)
            if key not in seen:
                seen.add(key)
                yield segments


def _pack_wheel_xz(wheel: str, out_dir: str) -> str:
    """Write the wheel's files as ``<wheel name>.tar.xz`` in ``out_dir``."""
    import tarfile
    import zipfile

    name = os.path.basename(wheel)
    if not name.endswith(".whl"):
        raise CarryError(f"{wheel}: not a wheel (.whl)")
    target = os.path.join(out_dir, name[: -len(".whl")] + ".tar.xz")
    with zipfile.ZipFile(wheel) as z, tarfile.open(target + ".tmp", "w:xz") as tar:
        for info in z.infolist():
            if info.is_dir():
                continue
            entry = tarfile.TarInfo(info.filename)
            entry.size = info.file_size
            entry.mode = (
                0o755 if info.filename.endswith(".so") or ".so." in info.filename else 0o644
            )
            with z.open(info) as member:
                tar.addfile(entry, member)
    os.replace(target + ".tmp", target)
    return target


def extract_wheel_xz(archive: str, target: str) -> None:
    """Unpack an xz-packed wheel into ``target`` (a folder for ``sys.path``). Entries that
    would land outside ``target`` (absolute, ``..``, links) are refused."""
    import tarfile

    root = os.path.realpath(target)
    with tarfile.open(archive, "r:xz") as tar:
        members = tar.getmembers()
        for m in members:
            dest = os.path.realpath(os.path.join(root, m.name))
            if not m.isfile() or not dest.startswith(root + os.sep):
                raise CarryError(f"{archive}: refusing entry {m.name!r} (not a file inside)")
        tar.extractall(root, members=members, filter="data")


def extract_once(archive: str, target: str) -> None:
    """:func:`extract_wheel_xz` into ``target`` unless it is already there: unpacked into
    a folder of this process, then renamed into place in one step. Jobs that unpack
    the same carry side by side never write over libraries another one has loaded
    (two did, and one died of a bus error)."""
    if os.path.isdir(target):
        return
    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    extract_wheel_xz(archive, staging)
    try:
        os.rename(staging, target)
    except OSError:  # another job renamed its copy first: use that one
        if not os.path.isdir(target):
            raise
        shutil.rmtree(staging, ignore_errors=True)


def install_pyav(carry_dir: str) -> None:
    """Make ``import av`` work: already there, else the carried wheel (pip, or unzipped),
    else the carried xz-packed wheel (unpacked onto ``sys.path``)."""
    import importlib

    try:
        import av  # noqa: F401

        return
    except ImportError:
        pass
    wheels = glob.glob(os.path.join(carry_dir, "av-*.whl"))
    packed = glob.glob(os.path.join(carry_dir, "av-*.tar.xz"))
    if not wheels and packed:
        target = os.path.join(carry_dir, "_site")
        extract_once(packed[0], target)
        sys.path.insert(0, target)
        importlib.invalidate_caches()
        import av  # noqa: F401

        return
    if not wheels:
        raise CarryError(f"{carry_dir}: no PyAV wheel and no PyAV installed")

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
        plans = (_PLAN_PREFIX, _PLAN_SHOTS_PREFIX)
        self._cache = OrderedDict(
            (k, v.float()) for k, v in self.table.items() if not k.startswith(plans)
        )
        self._plans = {k: v for k, v in self.table.items() if k.startswith(plans)}
        first = next(iter(self._cache.values()), None)
        if first is None:
            first = next(v for k, v in self._plans.items() if k.startswith(_PLAN_PREFIX))
        self.embed_dim = first.shape[1]

    def embed_tokens(self, prompt: str) -> torch.Tensor:
        hit = self._cache.get(prompt)
        if hit is None:
            raise CarryError(f"text not in the carried embedding table: {prompt!r}")
        return hit

    def embed_segments(self, segments, max_tokens: int | None = None):
        """(L, D) tokens and (L,) shot ids of a plan, as the frozen encoder made them
        when the carry was packed (the joint pass cannot be rebuilt from the texts)."""
        budget = int(max_tokens or self.max_tokens)
        tokens = self._plans.get(plan_key(segments, budget))
        shots = self._plans.get(plan_shots_key(segments, budget))
        if tokens is None or shots is None:
            carried = sorted(
                {
                    json.loads(k[len(_PLAN_PREFIX) :])[0]
                    for k in self._plans
                    if k.startswith(_PLAN_PREFIX)
                }
            )
            raise CarryError(
                f"multi-shot plan not in the carried embedding table at {budget} tokens "
                f"(carried budgets: {carried or 'none'}): {[s.text for s in segments]!r}"
            )
        return tokens.float(), shots.long()

    def encode(self, prompts: list[str]):
        rows = [self.embed_tokens(p) for p in prompts]
        length = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), length, self.embed_dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return out, mask


def add_texts(carry_dir: str, texts: list[str]) -> int:
    """Embed ``texts`` with the frozen text encoder into the carry's table (texts already
    there are kept as they are); returns how many were added.

    What a job on the host will encode besides the clips' conditioning texts (prompts
    without their dialogue, a distillation's grammar pool) has to be embedded here,
    where the encoder is: the host has only the table."""
    from safetensors.torch import load_file, save_file

    from model.text_encoder import FrozenTextEncoder

    path = os.path.join(carry_dir, TEXTS_NAME)
    table = load_file(path)
    new = sorted({t for t in texts if t and t not in table})
    encoder = FrozenTextEncoder()
    for i in range(0, len(new), 64):
        chunk = new[i : i + 64]
        tokens, mask = encoder.encode(chunk)
        for text, tok, m in zip(chunk, tokens, mask, strict=True):
            table[text] = tok[m].to(torch.float16).contiguous()
    if new:
        save_file(table, path + ".tmp")
        os.replace(path + ".tmp", path)
    return len(new)


def use_text_table(carry_dir: str) -> None:
    """Pipelines built from now on embed text from the carried table."""
    use_text_table_file(os.path.join(carry_dir, TEXTS_NAME))


def use_text_table_file(path: str) -> None:
    """Pipelines built from now on embed text from the table at ``path``."""
    from safetensors.torch import load_file

    import model.pipeline

    TableTextEncoder.table = load_file(path)
    model.pipeline.FrozenTextEncoder = TableTextEncoder


def use_carry_texts(carry_dir: str) -> list[str]:
    """For a tool on a host without the text encoder: install the carry's PyAV, embed
    text from its table, and return the table's captions (not audio prompts or plans)."""
    install_pyav(carry_dir)
    use_text_table(carry_dir)
    return [k for k in TableTextEncoder.table if not k.startswith(("@", _PLAN_PREFIX[0]))]


def unpack(carry_dir: str, work_dir: str) -> str:
    """Install PyAV, point the manifest at the carried clips, use the text table
    (a captions-only carry: the table and the rows, ``clip_uri`` empty).

    Returns the manifest to train on (``data.curated_uri``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    carry_dir = os.path.abspath(carry_dir)
    for name in (MANIFEST_NAME, TEXTS_NAME, INFO_NAME):
        if not os.path.isfile(os.path.join(carry_dir, name)):
            raise CarryError(f"{carry_dir}: {name} missing")
    check_version(carry_dir)
    clips = has_clips(carry_dir)
    if clips:
        install_pyav(carry_dir)
    table = pq.read_table(os.path.join(carry_dir, MANIFEST_NAME))
    rows = table.to_pylist()
    for row in rows if clips else ():
        row["clip_uri"] = os.path.join(carry_dir, row["clip_uri"])
        if not os.path.isfile(row["clip_uri"]):
            raise CarryError(f"carried clip missing: {row['clip_uri']}")
    os.makedirs(work_dir, exist_ok=True)
    manifest = os.path.join(work_dir, MANIFEST_NAME)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), manifest)
    _unpack_sequences(carry_dir, work_dir)
    use_text_table(carry_dir)
    return manifest


def has_clips(carry_dir: str) -> bool:
    """Whether the carry holds its clips (every carry before version 3 does)."""
    with open(os.path.join(carry_dir, INFO_NAME)) as f:
        return bool(json.load(f).get("has_clips", True))


def check_version(carry_dir: str) -> int:
    """The carry's format version; a newer one than this code reads is refused."""
    with open(os.path.join(carry_dir, INFO_NAME)) as f:
        version = json.load(f).get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise CarryError(f"{carry_dir}: {INFO_NAME} has no valid schema_version ({version!r})")
    if version > CARRY_SCHEMA_VERSION:
        raise CarryError(
            f"{carry_dir}: carry schema_version {version}, this Duet reads up to "
            f"{CARRY_SCHEMA_VERSION}: update Duet on this host or pack the carry again"
        )
    if version < 2:
        logging.getLogger(__name__).warning(
            "%s: carry schema_version %d holds no multi-shot sequences; training takes "
            "no multi-shot steps (pack it again to carry them)", carry_dir, version
        )  # fmt: skip
    return version


def _unpack_sequences(carry_dir: str, work_dir: str) -> None:
    """The carried sequences table, with absolute ``sequence_uri``, beside the
    unpacked manifest (where training looks for it)."""
    path = os.path.join(carry_dir, SEQUENCES_NAME)
    target = os.path.join(work_dir, SEQUENCES_NAME)
    if not os.path.isfile(path):
        if os.path.exists(target):  # an earlier carry's table would name other files
            os.remove(target)
        return
    # Imported only here: it reads media through PyAV, which a captions-only carry
    # does not install.
    from pipelines.train.sequences import read_records, write_sequences

    rows = read_records(path)
    for row in rows:
        row["sequence_uri"] = os.path.join(carry_dir, row["sequence_uri"])
        if not os.path.isfile(row["sequence_uri"]):
            raise CarryError(f"carried sequence missing: {row['sequence_uri']}")
    write_sequences(target, rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Pack a carry folder for the GPU job.")
    parser.add_argument("--manifest", action="append", help="clips.parquet")
    parser.add_argument("--out", required=True)
    parser.add_argument("--wheel", help="PyAV wheel (abi3)")
    parser.add_argument(
        "--add-texts", metavar="FILE",
        help="only embed the texts of FILE (one a line) into the carry at --out",
    )  # fmt: skip
    parser.add_argument(
        "--wheel-xz", action="store_true", help="carry the wheel's files xz-packed (smaller)"
    )
    parser.add_argument(
        "--captions-only", action="store_true",
        help="the rows and their texts only: no clips, sequences or PyAV (alignment jobs)",
    )  # fmt: skip
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--max-clip-mib", type=float, default=16.0)
    parser.add_argument("--max-sequence-mib", type=float, default=8.0)
    parser.add_argument(
        "--plan-tokens", type=int, action="append", help="model text.max_tokens (default 77)"
    )
    args = parser.parse_args(argv)
    if args.add_texts:
        with open(args.add_texts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f]
        added = add_texts(args.out, texts)
        print(f"{added} text(s) added to {os.path.join(args.out, TEXTS_NAME)}")
        return
    if not args.manifest or not (args.wheel or args.captions_only):
        parser.error(
            "packing needs --manifest and --wheel (or --captions-only, or --add-texts FILE)"
        )

    def progress(n: int, used: int) -> None:
        if n % 50 == 0:
            print(f"{n} clips, {used / 2**20:.1f} MiB", flush=True)

    info = pack(
        args.manifest, args.out, args.wheel, args.frames, int(args.max_clip_mib * 2**20), progress,
        int(args.max_sequence_mib * 2**20), tuple(args.plan_tokens or (77,)), args.wheel_xz,
        args.captions_only,
    )  # fmt: skip
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
