"""What every ``duet`` command shares: URIs made absolute at the boundary, and errors
a user can cause printed as one line instead of a traceback.

Exit codes: 2 when what the user named cannot be used (a missing path, a checkpoint
of the wrong kind, a manifest of another schema version, a bad config); 1 when the
work itself failed (a port already taken, a source that failed to curate). Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn, TypeVar

import typer

USAGE = 2
FAILED = 1

# Typed errors that describe the input the user named, by (module, class name): the
# modules are imported lazily by the commands, so a class is looked up only when
# its module is loaded (an error of a module never imported cannot have happened).
_INPUT_ERRORS = (
    ("core.storage", "StorageError"),
    ("core.media", "MediaError"),
    ("core.config", "ConfigError"),
    ("core.ray_setup", "ClusterUnreachableError"),
    ("flows.prefect_api", "PrefectUnreachableError"),
    ("model.checkpoint", "CheckpointError"),
    ("curation.manifest", "ManifestError"),
    ("pipelines.train.data", "TrainDataError"),
    ("pipelines.adgen", "BriefError"),
    ("serve.worker", "NoCheckpointError"),
)

F = TypeVar("F", bound=Callable)


def absolute(uri: str | None) -> str | None:
    """``core.storage.absolute_uri`` of an optional CLI argument."""
    if not uri:
        return uri
    from core import storage

    return storage.absolute_uri(uri)


def absolute_all(uris: Iterable[str] | None) -> list[str]:
    return [absolute(u) for u in uris or []]


def fail(message: str, code: int = USAGE) -> NoReturn:
    """Print ``error: message`` on one line of stderr and exit with ``code``."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code=code)


def warn(message: str) -> None:
    typer.echo(f"warning: {one_line(message)}", err=True)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def _input_error_classes() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError]
    for module, name in _INPUT_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            found.append(getattr(loaded, name))
    return tuple(found)


def _input_error_in(err: BaseException) -> BaseException | None:
    """``err`` or the typed input error it was raised from (``raise ... from``); an
    error raised while handling another (``__context__``) is not caused by it."""
    seen = set()
    classes = _input_error_classes()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, classes):
            return err
        err = err.__cause__
    return None


def one_line_errors(command: F) -> F:
    """Wrap a command so the typed errors of :data:`_INPUT_ERRORS` exit 2 with one line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as err:
            if getattr(err, "exit_code", None) is not None:  # click's own usage errors
                raise
            cause = _input_error_in(err)
            if cause is None:
                raise
            fail(str(cause), USAGE)

    return wrapper  # type: ignore[return-value]
