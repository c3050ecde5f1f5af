"""A small client of the job API (batch runs, the load generator, the benchmark).

It honours back-pressure: a 429 or 503 answer is retried after its ``Retry-After``
(bounded by ``max_wait_s``), so a caller that submits faster than the service runs
slows down instead of piling up requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class Submitted:
    id: str
    submitted_at: float
    rejected: int  # 429/503 answers before it was accepted


class DuetClient:
    def __init__(self, url: str, api_key: str, timeout_s: float = 60.0):
        self.http = httpx.Client(
            base_url=url.rstrip("/") + "/", headers={"X-API-Key": api_key}, timeout=timeout_s
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> DuetClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _check(response: httpx.Response) -> dict:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:300]
            raise ApiError(response.status_code, str(detail))
        return response.json()

    def submit(self, job: dict, max_wait_s: float = 600.0, retry: bool = True) -> Submitted:
        """POST a job; on 429/503 wait Retry-After and try again (``retry``)."""
        deadline = time.time() + max_wait_s
        rejected = 0
        while True:
            response = self.http.post("v1/jobs", json=job)
            if response.status_code in (429, 503) and retry and time.time() < deadline:
                rejected += 1
                wait = float(response.headers.get("Retry-After", "1") or 1)
                time.sleep(min(max(wait, 0.2), max(0.0, deadline - time.time())))
                continue
            body = self._check(response)
            return Submitted(body["id"], time.time(), rejected)

    def status(self, job_id: str) -> dict:
        return self._check(self.http.get(f"v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict:
        return self._check(self.http.post(f"v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> dict:
        deadline = time.time() + timeout_s
        while True:
            job = self.status(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def video(self, job_id: str) -> bytes:
        response = self.http.get(f"v1/jobs/{job_id}/video")
        if response.status_code != 200:
            self._check(response)
        return response.content

    def metadata(self, job_id: str) -> dict:
        return self._check(self.http.get(f"v1/jobs/{job_id}/metadata"))

    def ready(self) -> bool:
        try:
            return self.http.get("readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict:
        return self._check(self.http.get("v1/info"))
