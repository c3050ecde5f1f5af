"""@-bindings: a prompt names what each reference is for (``@image1 subject``).

A reference slot alone does not say what to take from it. Training pairs share
exactly one attribute with their target (``pipelines.train.reference_pairs``) and
the prompt names that role with a binding: ``@<kind><n> <word>``, ``kind`` one of
``image``/``video``/``audio``, ``n`` the 1-based slot, ``word`` the role:

- ``subject``: the reference's subject appearance (image)
- ``motion``: its motion or camera path (video)
- ``tempo``: its tempo (audio)
- ``voice``: its speaker's voice (audio)

A binding is encoded apart from the rest of the prompt and appended after it:
tokens = encode(prompt without bindings) ++ encode(binding 1) ++ ... in prompt
order. Training builds exactly these tokens from the cached caption tokens and the
binding phrases (``pipelines.train.batches``), so a prompt means the same to the
model in training and at generation. A prompt without bindings is encoded as it
always was. The clip's own first frame (image-to-video) is no binding: it has a
slot of its own, the model's last image slot (:data:`I2V_IMAGE_SLOT`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KINDS = ("image", "video", "audio")
ROLE_WORDS = ("subject", "motion", "tempo", "voice")
BINDING = re.compile(
    r"@(image|video|audio)([1-9])\b(?:\s+(" + "|".join(ROLE_WORDS) + r")\b)?", re.IGNORECASE
)
# Offset from the end of the image slots: the first frame of an I2V request.
I2V_IMAGE_SLOT = -1


@dataclass(frozen=True)
class Binding:
    kind: str  # image | video | audio
    slot: int  # 0-based slot of that kind
    word: str = ""  # role word, "" when the prompt names none

    @property
    def phrase(self) -> str:
        return binding_phrase(self.kind, self.slot, self.word)


def binding_phrase(kind: str, slot: int, word: str = "") -> str:
    """The canonical text of a binding: ``@image1 subject``."""
    if kind not in KINDS:
        raise ValueError(f"binding kind must be one of {KINDS}, got {kind!r}")
    if word and word not in ROLE_WORDS:
        raise ValueError(f"binding word must be one of {ROLE_WORDS}, got {word!r}")
    return f"@{kind}{slot + 1}" + (f" {word}" if word else "")


def all_binding_phrases(max_slot: int = 9) -> list[str]:
    """Every phrase :func:`binding_phrase` can make for slots 1..``max_slot``: what a
    precomputed text table must hold for the binder (training draws any of them)."""
    return [
        binding_phrase(kind, slot, word)
        for kind in KINDS
        for slot in range(max_slot)
        for word in ("",) + ROLE_WORDS
    ]


def split_bindings(prompt: str) -> tuple[str, list[Binding]]:
    """(the prompt without its bindings, the bindings in prompt order)."""
    bindings = [
        Binding(m.group(1).lower(), int(m.group(2)) - 1, (m.group(3) or "").lower())
        for m in BINDING.finditer(prompt)
    ]
    rest = " ".join(BINDING.sub(" ", prompt).split())
    return rest, bindings


def check_bindings(bindings: list[Binding], counts: dict[str, int]) -> None:
    """Every binding names a reference that is given (``counts``: kind -> number)."""
    for b in bindings:
        if b.slot >= counts.get(b.kind, 0):
            raise ValueError(
                f"the prompt binds @{b.kind}{b.slot + 1} but {counts.get(b.kind, 0)} "
                f"{b.kind} reference(s) are given"
            )


def join_tokens(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """(sum L, D) tokens of the prompt's pieces, in order."""
    parts = [p for p in parts if p.shape[0]]
    return torch.cat(parts) if parts else torch.zeros(0, dim)


def embed_prompt(encoder, prompt: str) -> torch.Tensor:
    """(L, D) tokens of a prompt with bindings: the rest, then each binding phrase
    (``encoder.embed_tokens`` for each piece, as training joins them)."""
    rest, bindings = split_bindings(prompt)
    if not bindings:
        return encoder.embed_tokens(prompt)
    parts = [encoder.embed_tokens(rest)] if rest else []
    parts += [encoder.embed_tokens(b.phrase) for b in bindings]
    return join_tokens(parts, encoder.embed_dim)


def encode_prompt(pipeline, prompt: str, counts: dict[str, int] | None = None):
    """The prompt's TextConditioning (batch 1); bindings are checked against the
    given references' ``counts`` and encoded as :func:`embed_prompt` says."""
    _, bindings = split_bindings(prompt)
    if not bindings:
        return pipeline.encode_text([prompt])
    check_bindings(bindings, counts or {})
    from model.dit import TextConditioning

    tokens = embed_prompt(pipeline.text_encoder, prompt)[None].to(pipeline.device)  # (1, L, D)
    return TextConditioning(
        tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    )
