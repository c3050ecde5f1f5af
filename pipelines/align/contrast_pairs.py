"""Known-order preference pairs made from the training corpus, for the reward model.

The preference table holds a few generated candidates for each of a few prompts
(drawing them is most of the rlhf stage's time), and a reward model fitted to them
learns those prompts rather than what adherence or sync are: on prompts it never saw
it agrees with the rater at chance (BENCHMARKS.md, sessions 12-13). The corpus holds
hundreds of captioned clips whose caption is right about them, and two edits of a
clip give pairs whose order needs no rater:

- **adherence**: the clip under its own caption beats the same clip under another
  clip's caption naming other colours (same latents, other words: the model has to
  read the prompt against the picture);
- **sync**: the clip beats itself with its soundtrack's latents rotated by
  ``shift_steps`` video latent steps (same picture, same words, sound off its
  impacts). Only clips with sound (the corpus's kept clips passed curation's AV-sync
  check).

Rows look like the preference table's (``score_*`` and ``rank_*`` empty, so the
table's own pair rules find nothing in them) with ``split = "train"``; their pairs
come from :func:`contrast_pairs`. Clips whose caption is a held-out prompt are never
used, as a clip's own caption or as another's, so held-out agreement still measures
prompts the reward model never saw.
"""

from __future__ import annotations

import torch

from core.probes.captions import parse_caption, without_dialogue
from pipelines.align.config import HEADS

CONTRAST_RATER_ID = "corpus-contrast"
ROLES = ("own", "other_caption", "shifted_sound")


def pick_contrasts(captions: list[str], has_sound: list[bool], held_out, count: int, seed: int):
    """Up to ``count`` (clip, other clip or None, has sound) triples over corpus clips,
    in a seeded order. The other clip's prompt (its caption, dialogue removed) and
    clip ``i``'s both name coloured shapes, of different colours, and neither is held
    out. A clip without such a partner gives only its sync pair (when it has sound);
    one with neither gives nothing."""
    prompts = [without_dialogue(c) for c in captions]
    colours = [frozenset(c for c, _ in parse_caption(p)) for p in prompts]
    held = set(held_out)
    usable = [i for i, p in enumerate(prompts) if p and p not in held]
    gen = torch.Generator().manual_seed(seed)
    order = [usable[j] for j in torch.randperm(len(usable), generator=gen).tolist()]
    out = []
    for i in order:
        partners = [j for j in order if colours[i] and colours[j] and colours[j] != colours[i]]
        other = (
            partners[int(torch.randint(len(partners), (1,), generator=gen))] if partners else None
        )
        if other is None and not has_sound[i]:
            continue
        out.append((i, other, has_sound[i]))
        if len(out) == count:
            break
    return prompts, out


def contrast_rows(prompts: list[str], picks) -> list[dict]:
    """Preference-table-like rows of the picks: per pick its own row, then the
    other-caption row and the shifted-sound row where it has them. ``clip`` is the
    corpus index whose latents the row reads; ``contrast`` names the pick."""
    rows = []
    for n, (i, other, sync) in enumerate(picks):
        roles = [("own", prompts[i])]
        if other is not None:
            roles.append(("other_caption", prompts[other]))
        if sync:
            roles.append(("shifted_sound", prompts[i]))
        for k, (role, prompt) in enumerate(roles):
            row = {
                "group_id": f"contrast-{n}", "candidate": k, "prompt": prompt,
                "references": "{}", "seed": 0, "noise_seed": 0, "clip_uri": "",
                "latent_uri": "", "rater_id": CONTRAST_RATER_ID, "split": "train",
                "contrast": n, "contrast_role": role, "clip": i,
            }  # fmt: skip
            for h in HEADS:
                row[f"score_{h}"] = None
                row[f"rank_{h}"] = None
            rows.append(row)
    return rows


def contrast_latents(rows: list[dict], corpus_latents, shift_steps: int, audio_per_video: int):
    """(video, audio) latents of each row: the corpus clip's, the audio rotated in
    time for ``shifted_sound`` rows. ``corpus_latents(i)`` -> ((Cv, T, h, w), (Ca, N))."""
    videos, audios = [], []
    for row in rows:
        video, audio = corpus_latents(row["clip"])
        if row["contrast_role"] == "shifted_sound":
            audio = torch.roll(audio, shift_steps * audio_per_video, dims=-1)
        videos.append(video)
        audios.append(audio)
    return torch.stack(videos), torch.stack(audios)


def contrast_pairs(rows: list[dict], head: str, weight: float) -> list[tuple[dict, dict, float]]:
    """(winner, loser, weight) of ``head`` among the contrast rows in ``rows``: own
    caption over another's (adherence), own sound over shifted (sync)."""
    loser_role = {"adherence": "other_caption", "sync": "shifted_sound"}.get(head)
    if loser_role is None or weight <= 0:
        return []
    by_pick: dict[int, dict[str, dict]] = {}
    for row in rows:
        if row.get("rater_id") == CONTRAST_RATER_ID:
            by_pick.setdefault(row["contrast"], {})[row["contrast_role"]] = row
    return [
        (roles["own"], roles[loser_role], weight)
        for roles in by_pick.values()
        if "own" in roles and loser_role in roles
    ]
