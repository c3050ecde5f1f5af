"""S3 calls through ``core.storage``: a new client per call against the reused one, side by side.

    .venv/bin/python -m bench.storage_s3 [--calls 50]

Starts moto's S3 server on loopback, writes one small object, then times ``--calls``
pairs of ``exists`` + ``read`` two ways in one run: with a filesystem built afresh for
every call (what ``core.storage.filesystem`` did until session 41:
``skip_instance_cache=True`` each time, so a boto session and botocore's service models
each time) and with ``core.storage``'s reused one. Prints CPU and wall seconds a pair
and the ratio.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from unittest import mock


@contextmanager
def _loopback_s3():
    from moto.server import ThreadedMotoServer

    from core.ports import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    try:
        with mock.patch.dict(os.environ, env):
            yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()


def _pairs(uri: str, calls: int) -> tuple[float, float]:
    """CPU and wall seconds of one ``exists`` + ``read_text`` pair, averaged."""
    from core import storage

    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        assert storage.exists(uri) and storage.read_text(uri) == "bench"
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    import boto3
    import fsspec

    from core import storage

    with _loopback_s3() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="duet-bench")
        uri = "s3://duet-bench/one.txt"
        storage.write_text(uri, "bench")
        _pairs(uri, 2)  # imports and the first client, for both ways

        def fresh(_uri: str):
            return fsspec.filesystem("s3", skip_instance_cache=True, **storage._s3_options())

        with mock.patch.object(storage, "filesystem", fresh):
            fresh_cpu, fresh_wall = _pairs(uri, args.calls)
        reused_cpu, reused_wall = _pairs(uri, args.calls)
    row = {"calls": args.calls, "fresh_cpu_s": fresh_cpu, "fresh_wall_s": fresh_wall,
           "reused_cpu_s": reused_cpu, "reused_wall_s": reused_wall,
           "cpu_ratio": fresh_cpu / reused_cpu}  # fmt: skip
    print(f"{'client':8} {'CPU s a pair':>13} {'wall s a pair':>14}")
    print(f"{'fresh':8} {fresh_cpu:13.4f} {fresh_wall:14.4f}")
    print(f"{'reused':8} {reused_cpu:13.4f} {reused_wall:14.4f}")
    print(f"a new client per call costs {row['cpu_ratio']:.0f}x the CPU of the reused one")
    return row


if __name__ == "__main__":
    main()
