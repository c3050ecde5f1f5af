"""Jobs kept in storage (any URI), so they outlive the ingress that accepted them.

Layout under ``jobs_uri``::

    jobs/<id>/job.json            the record (spec, status, progress, attempts, error)
    jobs/<id>/inputs/<kind>-<i>   references, as uploaded or fetched, probed
    jobs/<id>/cancel              written by a cancel; the worker stops when it sees it
    jobs/<id>/output/clip.mp4     the result, and output/metadata.json beside it

Job ids are 32 hex characters, the first 12 the creation time in milliseconds, so
the newest jobs sort last. ``job.json`` is written whole (local writes go through a
temporary file and a rename in ``core.storage``), by the ingress until the job is
dispatched and by the replica that runs it after that; a cancel never rewrites it
under a running replica (it writes the marker instead), so no write is lost.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from core import storage

# 2: jobs carry their tenant and, for a Fast job run on the Full model, the reason.
# A version-1 record (written before tenancy) is read as the "default" tenant's.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")


def new_job_id() -> str:
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


@dataclass
class JobRecord:
    id: str
    spec: dict[str, Any]
    quality: str
    model: str = "default"
    status: str = "queued"
    progress: float = 0.0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    attempts: int = 0
    replica: str | None = None
    error: str | None = None
    output_uri: str | None = None
    metadata_uri: str | None = None
    compute_s: float | None = None
    inputs: dict[str, list[str]] = field(default_factory=dict)
    tenant: str = "default"
    # Set when a Fast job runs on the Full model (a mode the Fast student was not
    # distilled for, and the config says so): why, for the job's metadata.
    fallback: str | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def deployment(self) -> str:
        """The model deployment that runs it: its quality's, or Full for a fallback."""
        return "full" if self.fallback else self.quality

    def public(self) -> dict[str, Any]:
        """What the API shows (storage URIs of inputs stay server-side)."""
        out = asdict(self)
        out.pop("inputs", None)
        out.pop("replica", None)
        return out


class JobStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def job_dir(self, job_id: str) -> str:
        return storage.join(self.root, "jobs", job_id)

    def record_uri(self, job_id: str) -> str:
        return storage.join(self.job_dir(job_id), "job.json")

    def cancel_uri(self, job_id: str) -> str:
        return storage.join(self.job_dir(job_id), "cancel")

    def output_uri(self, job_id: str) -> str:
        return storage.join(self.job_dir(job_id), "output", "clip.mp4")

    def metadata_uri(self, job_id: str) -> str:
        return storage.join(self.job_dir(job_id), "output", "metadata.json")

    def input_uri(self, job_id: str, name: str) -> str:
        return storage.join(self.job_dir(job_id), "inputs", name)

    def save(self, record: JobRecord) -> JobRecord:
        record.updated_at = time.time()
        storage.write_json(self.record_uri(record.id), asdict(record))
        return record

    def load(self, job_id: str) -> JobRecord | None:
        uri = self.record_uri(job_id)
        for attempt in range(5):
            try:
                data = storage.read_json(uri)
                break
            except (FileNotFoundError, storage.StorageError):
                return None
            except (OSError, json.JSONDecodeError):
                # The record was replaced while being read (S3 answers a changed ETag
                # with PreconditionFailed): read the new one.
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        if data.get("schema_version") not in READABLE_VERSIONS:
            raise ValueError(f"{uri}: unknown job schema {data.get('schema_version')!r}")
        data["schema_version"] = SCHEMA_VERSION
        return JobRecord(**data)

    def request_cancel(self, job_id: str) -> None:
        storage.write_text(self.cancel_uri(job_id), str(time.time()))

    def cancel_requested(self, job_id: str) -> bool:
        return storage.exists(self.cancel_uri(job_id))

    def job_ids(self) -> list[str]:
        """Every job id, oldest first."""
        base = storage.join(self.root, "jobs")
        if not storage.exists(base):
            return []
        fs = storage.filesystem(base)
        names = []
        for entry in fs.ls(storage.strip_scheme(base), detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if len(name) == 32 and all(c in "0123456789abcdef" for c in name):
                names.append(name)
        return sorted(names)

    def recent(self, limit: int, tenant: str | None = None) -> list[JobRecord]:
        """The newest ``limit`` jobs, of ``tenant`` only unless it is None (all)."""
        out = []
        for job_id in reversed(self.job_ids()):
            record = self.load(job_id)
            if record is not None and (tenant is None or record.tenant == tenant):
                out.append(record)
            if len(out) >= limit:
                break
        return out

    def unfinished(self) -> list[JobRecord]:
        out = []
        for job_id in self.job_ids():
            record = self.load(job_id)
            if record is not None and not record.terminal:
                out.append(record)
        return out
