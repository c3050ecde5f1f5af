"""What the web page suggests: prompts the served model was trained on.

A small model knows only the words of its training captions; the page once offered
"a red ball bounces on a wooden floor", not one word of which the shipped model had
seen. The page's examples and placeholder come from the served checkpoint instead:

1. ``extra.caption_examples``: captions recorded in the checkpoint (the shipped
   checkpoint records them, see checkpoints/default/README.md);
2. else the captions of its training data (``extra.train_config.data.curated_uri``),
   when that manifest can still be read;
3. else none, and the page lists the words of ``extra.caption_vocabulary``.

Prompts with a word outside the recorded vocabulary are never suggested.
"""

from __future__ import annotations

import logging

from pipelines.train.vocabulary import checkpoint_vocabulary, pick_examples, training_captions

log = logging.getLogger(__name__)

EXAMPLES_KEY = "caption_examples"
MAX_EXAMPLES = 6


def _data_captions(meta: dict) -> list[str]:
    """Captions of the checkpoint's training data, or [] when it cannot be read."""
    data = ((meta.get("extra") or {}).get("train_config") or {}).get("data") or {}
    curated = data.get("curated_uri")
    if not curated:
        return []
    try:
        # The clips it trained on: its own frame buckets decide which were long enough.
        fps = float(meta["config"]["fps"])
        return training_captions(curated, fps, data.get("frame_buckets"))
    except Exception as err:  # gone, moved, another schema: the page does without
        log.info("no example captions from %s: %s", curated, err)
        return []


def model_examples(checkpoint_uri: str | None, limit: int = MAX_EXAMPLES) -> dict:
    """``{"prompts": [...], "vocabulary": [...]}`` for the page (both may be empty:
    random weights, or a checkpoint that records neither)."""
    if checkpoint_uri is None:
        return {"prompts": [], "vocabulary": []}
    from model.checkpoint import read_meta

    meta = read_meta(checkpoint_uri)
    vocabulary = checkpoint_vocabulary(meta)
    recorded = (meta.get("extra") or {}).get(EXAMPLES_KEY)
    captions = list(recorded) if isinstance(recorded, list) else _data_captions(meta)
    return {
        "prompts": pick_examples(captions, vocabulary, limit),
        "vocabulary": vocabulary or [],
    }
