"""Bounded load on the job API from its own process: ``python -m serve.loadgen URL ...``.

``concurrency`` client threads each keep one job in flight (submit, wait for it,
submit the next) for ``seconds``; then no new job is submitted and every accepted
job is waited for. A 429/503 is counted and honoured (the thread sleeps its
Retry-After). The summary counts every accepted job by its final state, so a job
that was lost (never finished) shows up as ``unfinished``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

from serve.client import ApiError, DuetClient


def run_load(
    url: str,
    api_key: str,
    concurrency: int,
    seconds: float,
    job: dict,
    finish_timeout_s: float = 600.0,
    stop_file: str | None = None,
) -> dict:
    """``seconds`` of load, or until ``stop_file`` exists (whichever comes first)."""
    import os

    lock = threading.Lock()
    records: list[dict] = []
    rejected = [0]
    stop_at = time.time() + seconds

    def worker(index: int) -> None:
        with DuetClient(url, api_key) as client:
            n = 0
            while time.time() < stop_at and not (stop_file and os.path.exists(stop_file)):
                body = {
                    **job,
                    "seed": index * 100_000 + n,
                    "prompt": f"{job.get('prompt', 'a ball')} {n}",
                }  # noqa: E501
                n += 1
                started = time.time()
                try:
                    submitted = client.submit(body, retry=False)
                except ApiError as err:
                    if err.status in (429, 503):
                        with lock:
                            rejected[0] += 1
                        time.sleep(1.0)
                        continue
                    raise
                entry = {"id": submitted.id, "submitted_at": started}
                try:
                    final = client.wait(submitted.id, timeout_s=finish_timeout_s, poll_s=0.25)
                    entry.update(status=final["status"], error=final.get("error"),
                                 attempts=final.get("attempts"))  # fmt: skip
                except TimeoutError:
                    entry.update(status="unfinished", error="timed out waiting")
                entry["finished_at"] = time.time()
                with lock:
                    records.append(entry)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    begun = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - begun
    return summarise(records, rejected[0], wall, seconds)


def summarise(records: list[dict], rejected: int, wall_s: float, load_s: float) -> dict:
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    done = [r for r in records if r["status"] == "succeeded"]
    latency = np.array([r["finished_at"] - r["submitted_at"] for r in done]) if done else None
    return {
        "accepted": len(records),
        "by_status": by_status,
        "rejected_429_503": rejected,
        "failed_reasons": sorted({r["error"] for r in records if r["status"] == "failed"}),
        "retried": sum(1 for r in records if (r.get("attempts") or 0) > 1),
        "wall_s": round(wall_s, 2),
        "load_s": load_s,
        "clips_per_min": round(60 * len(done) / wall_s, 2) if wall_s else 0.0,
        "latency_p50_s": round(float(np.percentile(latency, 50)), 3) if done else None,
        "latency_p99_s": round(float(np.percentile(latency, 99)), 3) if done else None,
        "jobs": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--key", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quality", default="fast")
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--out", default="-", help="JSON summary path ('-': stdout)")
    parser.add_argument("--stop-file", default=None, help="Stop submitting once this file exists")
    args = parser.parse_args(argv)
    job = {"prompt": "a red ball bounces", "quality": args.quality, "duration_s": args.duration}
    summary = run_load(
        args.url, args.key, args.concurrency, args.seconds, job, stop_file=args.stop_file
    )
    text = json.dumps(summary, indent=2)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
