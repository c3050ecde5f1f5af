"""Storage round trips on local disk and on a real S3 API server on loopback."""

from __future__ import annotations

import os

import pytest

from core import storage


@pytest.fixture(params=["local", "file_uri", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    if request.param == "file_uri":
        return f"file://{tmp_path}"
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_write_read_list_remove(root):
    a = storage.join(root, "a", "one.bin")
    b = storage.join(root, "a", "deeper", "two.json")
    storage.write_bytes(a, b"\x00\x01payload")
    storage.write_json(b, {"k": [1, 2, 3]})

    assert storage.exists(a) and storage.size(a) == 9
    assert storage.read_bytes(a) == b"\x00\x01payload"
    assert storage.read_json(b) == {"k": [1, 2, 3]}
    listed = storage.list_files(storage.join(root, "a"))
    assert sorted(listed) == sorted([a, b])
    assert storage.list_files(storage.join(root, "a"), suffixes=(".json",)) == [b]
    assert storage.glob(storage.join(root, "a", "*.bin")) == [a]

    storage.remove(a)
    assert not storage.exists(a)
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.read_bytes(a)


def test_overwrite_is_whole(root):
    target = storage.join(root, "x.txt")
    storage.write_text(target, "old" * 1000)
    storage.write_text(target, "new")
    assert storage.read_text(target) == "new"


def test_local_output_moves_only_on_success(root):
    target = storage.join(root, "out", "video.mp4")
    with pytest.raises(RuntimeError):
        with storage.local_output(target) as path:
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise RuntimeError("encoder crashed")
    assert not storage.exists(target)

    with storage.local_output(target) as path:
        with open(path, "wb") as fh:
            fh.write(b"complete")
    assert storage.read_bytes(target) == b"complete"
    with storage.local_copy(target) as local:
        assert os.path.exists(local)
        with open(local, "rb") as fh:
            assert fh.read() == b"complete"


def test_commit_marker(root):
    out = storage.join(root, "run1")
    assert not storage.is_committed(out)
    storage.write_marker(out, {"rows": 3})
    assert storage.is_committed(out)
    assert storage.read_json(storage.join(out, storage.MARKER_NAME)) == {"rows": 3}


def test_local_atomic_write_leaves_no_temp(tmp_path):
    target = str(tmp_path / "f.bin")
    storage.write_bytes(target, b"abc")
    assert os.listdir(tmp_path) == ["f.bin"]


def test_s3_reuses_one_client_and_still_sees_other_processes_writes(s3_bucket, monkeypatch):
    """One S3 filesystem per process and settings (a new one per call parsed botocore's
    models every time); what another process writes or removes shows at once, and other
    credentials get another client."""
    import subprocess
    import sys

    uri = f"{s3_bucket}/shared/one.txt"
    fs = storage.filesystem(uri)
    assert storage.filesystem(s3_bucket) is fs
    assert not storage.exists(uri) and storage.list_files(f"{s3_bucket}/shared") == []
    code = "import sys; from core import storage; storage.write_text(sys.argv[1], 'from afar')"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code, uri], cwd=root, check=True, timeout=120)
    assert storage.exists(uri) and storage.read_text(uri) == "from afar"
    assert storage.list_files(f"{s3_bucket}/shared") == [uri]
    code = "import sys; from core import storage; storage.remove(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, uri], cwd=root, check=True, timeout=120)
    assert not storage.exists(uri) and storage.list_files(f"{s3_bucket}/shared") == []

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    assert storage.filesystem(uri) is not fs
    monkeypatch.undo()
    assert storage.filesystem(uri) is fs


def test_a_forked_child_builds_its_own_s3_client_even_if_the_lock_was_held(s3_bucket):
    """A fork while another thread holds the client cache's lock must not leave the
    child waiting on it forever; the child reads S3 with a client of its own."""
    import multiprocessing

    uri = f"{s3_bucket}/forked.txt"
    storage.write_text(uri, "seen by the child")
    parent_fs = storage.filesystem(uri)
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child():
        results.put((storage.read_text(uri), storage.filesystem(uri) is parent_fs))

    with storage._s3_lock:  # as if another thread were building a client at the fork
        process = context.Process(target=child)
        process.start()
    process.join(timeout=30)
    assert process.exitcode == 0, "the forked child never finished"
    assert results.get(timeout=5) == ("seen by the child", False)
