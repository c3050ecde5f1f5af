"""Live training progress for ``duet train`` and ``duet demo``.

On a terminal: one rich bar per stage (step/total, loss, it/s, elapsed). Elsewhere
(CI logs, a pipe) a bar never renders, so one plain line is printed per new logged
step instead: a run of minutes always shows it is moving.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class TrainProgress:
    """The ``progress(stage, step, total, row)`` callback of ``pipelines.train.train``."""

    def __init__(self, console: Console, live: bool | None = None):
        self.console = console
        self.live = console.is_terminal if live is None else live
        columns = (
            TextColumn("train {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} it/s"),
            TimeElapsedColumn(),
        )
        self.bar = Progress(*columns, console=console, disable=not self.live)
        self.tasks: dict[str, int] = {}
        # stage -> (step, time) of its first logged row: the rate is measured from
        # there, so Ray's start-up and a resumed run's earlier steps do not count.
        self.first: dict[str, tuple[int, float]] = {}
        self.shown: dict[str, int] = {}

    def __enter__(self) -> TrainProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, stage: str, step: int, total: int, row: dict) -> None:
        now = time.monotonic()
        if row and stage not in self.first:
            self.first[stage] = (step, now)
        loss = row.get("loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "-"
        rate_text = "-"
        if stage in self.first:
            step0, t0 = self.first[stage]
            if step > step0 and now > t0:
                rate_text = f"{(step - step0) / (now - t0):.2f}"
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, loss="-", rate="-")
        self.bar.update(self.tasks[stage], completed=step, loss=loss_text, rate=rate_text)
        if not self.live and self.shown.get(stage) != step:
            self.shown[stage] = step
            if not row:
                self.console.print(
                    f"train {stage}: starting ({total} steps)", highlight=False, soft_wrap=True
                )
            else:
                self.console.print(
                    f"train {stage}: step {step}/{total} loss {loss_text} {rate_text} it/s",
                    highlight=False,
                    soft_wrap=True,
                )
