"""The user-facing errors of the runtime: each message says what is wrong and what to do.

The CLI turns any of ``USER_ERRORS`` into ``error: <message>`` and exit status 2. Each
module raises its own and re-exports it under its old name (``mapseg.artifact.ArtifactError``, ...).
"""
from __future__ import annotations


class ArtifactError(ValueError):
    """The artifact folder is missing, unreadable or inconsistent; the message says which part."""


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says what to install or do."""


class ClusterError(ValueError):
    pass


class OutputError(ValueError):
    """An output cannot be written as asked (it is an input, two outputs share a name, its folder is missing,
    read-only or full); raised before any work starts. The message says what to do."""


class RasterError(ValueError):
    """The raster cannot be read or written as asked; the message says what to do."""


class SegmentError(ValueError):
    """A user-facing problem with the inputs or options; the message says what to do."""


class SegmentCancelled(Exception):
    """The caller's ``callback`` asked to stop; no output was written (the partial file is removed)."""


class WorkerError(ValueError):
    """--workers / --threads cannot be honoured; the message says why."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's may run to many), or its type where it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


USER_ERRORS = (ArtifactError, BackendUnavailable, ClusterError, OutputError, RasterError, SegmentError,
               FileNotFoundError)
