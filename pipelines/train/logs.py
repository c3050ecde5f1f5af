"""Training logs beside the checkpoints: TensorBoard events, metrics.jsonl, an HTML report.

Only rank 0 writes. Object stores cannot append, so ``metrics.jsonl`` is rewritten
whole at every checkpoint and TensorBoard writes to a local directory that is copied
up at the same moments. A resumed run keeps the rows up to its checkpoint's step,
so the curves stay continuous across restarts.
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
import tempfile

from core import storage

METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.jsonl"
REPORT_NAME = "report.html"
CURVE_NAME = "loss.png"


class MetricsLog:
    def __init__(self, stage_uri: str, enabled: bool = True, resume_step: int = 0):
        self.stage_uri = stage_uri
        self.enabled = enabled
        self.rows: list[dict] = []
        self.samples: list[dict] = []  # which clips each step trained on (record_samples)
        self._writer = None
        self._tb_local = ""
        if not enabled:
            return
        for name, rows in ((METRICS_NAME, self.rows), (SAMPLES_NAME, self.samples)):
            uri = storage.join(stage_uri, name)
            if resume_step and storage.exists(uri):
                for line in storage.read_text(uri).splitlines():
                    row = json.loads(line)
                    if row["step"] <= resume_step:
                        rows.append(row)

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            if storage.scheme_of(self.stage_uri) in ("", "file"):
                self._tb_local = storage.strip_scheme(storage.join(self.stage_uri, "tensorboard"))
            else:
                self._tb_local = tempfile.mkdtemp(prefix="duet-tb-")
            self._writer = SummaryWriter(self._tb_local)
        return self._writer

    def add(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        writer = self._tensorboard()
        for key, value in values.items():
            writer.add_scalar(key, float(value), int(step))

    def add_samples(self, step: int, epoch: int, batch: int, clip_ids: list[str]) -> None:
        if self.enabled:
            self.samples.append({"step": step, "epoch": epoch, "batch": batch, "clips": clip_ids})

    def last(self) -> dict:
        return dict(self.rows[-1]) if self.rows else {}

    def flush(self) -> None:
        if not self.enabled:
            return
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        storage.write_text(storage.join(self.stage_uri, METRICS_NAME), text)
        if self.samples:
            text = "".join(json.dumps(r) + "\n" for r in self.samples)
            storage.write_text(storage.join(self.stage_uri, SAMPLES_NAME), text)
        if self._writer is not None:
            self._writer.flush()
            if storage.scheme_of(self.stage_uri) not in ("", "file"):
                for name in os.listdir(self._tb_local):
                    with open(os.path.join(self._tb_local, name), "rb") as f:
                        storage.write_bytes(
                            storage.join(self.stage_uri, "tensorboard", name), f.read()
                        )

    def write_report(self, summary: dict) -> None:
        """``report.html`` with the loss curves (``loss.png``) and the stage's numbers."""
        if not self.enabled:
            return
        self.flush()
        storage.write_bytes(storage.join(self.stage_uri, CURVE_NAME), self._curve_png())
        rows = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
            for k, v in summary.items()
        )
        last = self.last()
        last_rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in last.items()
        )
        page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>Duet training: {html.escape(self.stage_uri)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 12px}}</style></head><body>
<h1>Stage report</h1><p>{html.escape(self.stage_uri)}</p>
<img src="{CURVE_NAME}" alt="loss curves" width="720">
<h2>Stage results</h2><table>{rows or "<tr><td>none</td></tr>"}</table>
<h2>Last logged step</h2><table>{last_rows}</table>
</body></html>"""
        storage.write_text(storage.join(self.stage_uri, REPORT_NAME), page)
        self.close()

    def close(self) -> None:
        """Close TensorBoard's writer; for an object store, remove its local mirror
        (everything in it was copied up by :meth:`flush`)."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        if storage.scheme_of(self.stage_uri) not in ("", "file"):
            shutil.rmtree(self._tb_local, ignore_errors=True)

    def _curve_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [
            k
            for k in ("loss", "video_loss", "audio_loss", "vocoder_loss")
            if any(k in r for r in self.rows)
        ]
        fig, ax = plt.subplots(figsize=(8, 4), dpi=90)
        for key in keys:
            pts = [(r["step"], r[key]) for r in self.rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend()
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
