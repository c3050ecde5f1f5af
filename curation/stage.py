"""One interface for every curation stage (after NeMo Curator's and cosmos-curate's).

A stage is a small class with a ``name``, a code ``version`` (bumped when its output
for the same input and config changes, so resumed runs recompute it), declared
``resources`` the executor schedules by, ``setup``/``teardown`` for what is costly
to make (a model, a worker process), and one ``process`` method over the
per-source :class:`SourceContext`. The source pipeline is a list of stages; Ray and
Prefect only run that list, so every stage is testable without either.

Stages come in two kinds. *Source* stages run once per source (validate, segment).
*Clip* stages run once per clip, on the :class:`ClipWindow` the context holds at
that moment: the clip's analysis frames and audio, a bounded window of the source,
never the whole of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from curation.records import ClipRecord, ShotRecord, SourceRecord


@dataclass(frozen=True)
class Resources:
    """What one running copy of a stage needs; the executor reserves it per task."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 0  # expected peak (0: unknown); scheduling hint, not a limit


@dataclass
class ClipWindow:
    """One clip's slice of the source: its analysis frames and its audio."""

    clip: ClipRecord
    luma: np.ndarray  # (T, h, w) uint8 analysis-size luma of the clip's frames
    audio: np.ndarray | None  # (C, N) float32 of the clip's span; None for video-only
    sample_rate: int
    keyframes: list[int] = field(default_factory=list)  # source keyframes in the clip


@dataclass
class SourceContext:
    """Everything known about one source while its stages run."""

    uri: str  # as given (may be s3://)
    out_uri: str
    source_id: str
    fingerprint: str
    path: str = ""  # local file holding the source (a download for remote URIs)
    source: SourceRecord | None = None
    shots: list[ShotRecord] = field(default_factory=list)
    clips: list[ClipRecord] = field(default_factory=list)
    windows: Iterator[ClipWindow] | None = None  # set by the segment stage
    window: ClipWindow | None = None  # the clip the clip stages work on now
    audio: Any = None  # core.media.AudioReader over the source, when it has audio
    notes: dict[str, Any] = field(default_factory=dict)


class SourceRejected(Exception):
    """A stage decided the source is unusable (not a failure of the code)."""

    def __init__(self, reason: str, size_bytes: int = -1):
        super().__init__(reason)
        self.reason = reason
        self.size_bytes = size_bytes


class Stage:
    """Base class: override ``process``; ``setup``/``teardown`` when needed."""

    name: ClassVar[str] = "stage"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "source"  # "source" (once per source) | "clip" (per window)
    config: Any = None

    @property
    def resources(self) -> Resources:
        return Resources()

    def setup(self) -> None:
        """Make what is costly once per worker (models, processes)."""

    def teardown(self) -> None:
        """Release what ``setup`` made."""

    def process(self, ctx: SourceContext) -> None:
        raise NotImplementedError


def stage_versions(stages: list[Stage]) -> dict[str, str]:
    return {s.name: s.version for s in stages}
