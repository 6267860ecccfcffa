"""Atomic file writes: a unique temporary name beside the target, then one rename.

A reader never sees a half-written file, and an interrupted run leaves the
previous file (if any) in place. Temporary names start with a dot and carry
the process id and a random tag (``temp_sibling``), so two runs never share one.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def temp_sibling(path: str | Path, kind: str = "", suffix: str = ".tmp") -> Path:
    """``.NAME.[KIND-]<pid>-<8 hex>SUFFIX`` in the folder of ``path``: a name no other write uses."""
    path = Path(path)
    tag = f"{kind}-" if kind else ""
    return path.with_name(f".{path.name}.{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def remove_if_present(*paths: str | Path) -> None:
    """Delete these files where they exist (the clean-up of a write that did not finish)."""
    for p in paths:
        Path(p).unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a unique temporary sibling, then rename: never a half-written file."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        remove_if_present(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (see ``write_bytes_atomic``)."""
    write_bytes_atomic(path, text.encode())
