"""Atomic file writes: a unique temporary name beside the target, then one rename; outputs checked first.

A reader never sees a half-written file, and an interrupted run leaves the
previous file (if any) in place. Temporary names start with a dot and carry
the process id, a tag of the host and a random tag (``temp_sibling``), so two
runs never share one. A run killed outright (SIGKILL, a power cut) cannot
remove its own: the next run writing in that folder does (``remove_dead_leftovers``,
called by ``check_outputs``: only the names mapseg itself writes, ``TEMP_KINDS``, of
processes of this host that are no longer alive; never a live run's, never another
host's, never a file or folder of the user's that merely looks alike).

``check_outputs`` runs before any work: an output must not be an input (by any
path, symlink or hard link) nor another output, and its folder must exist, be
writable and have room for it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from .errors import OutputError


def _pid_namespace() -> str:
    """The inode of this process's PID namespace (Linux; "" elsewhere): containers differ by it."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _boot_id() -> str:
    """This boot's id (Linux; "" elsewhere): machines that share a host name differ by it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def host_tag() -> str:
    """6 hex digits naming the PID space of this process: a process id in a temporary's name means a process
    only where the tag is the same. On Linux the host name, the PID namespace (two containers with one host
    name, each with its own PIDs, writing to one volume) and the boot id (two machines with one host name;
    a run killed by a power cut is therefore another boot's: its leftover stays, for the user to delete);
    elsewhere the host name alone (neither is known there)."""
    identity = "\0".join((socket.gethostname(), _pid_namespace(), _boot_id()))
    return hashlib.sha1(identity.encode()).hexdigest()[:6]


HOST_TAG = host_tag()
# The temporaries mapseg writes (temp_sibling): kind -> the suffixes it writes with it. "" (write_bytes_atomic),
# "probe" (check_folder), "part" (label writers, + ".cog.tif"), "polygons" (the QGIS plugin: a folder).
TEMP_KINDS = {"": (".tmp",), "probe": ("",), "part": (".tif", ".cog.tif"), "polygons": ("",)}
TEMP_FOLDER_KINDS = ("polygons",)
LEGACY_KINDS = {"": (".tmp",), "part": (".tif", ".cog.tif")}  # names written before the host tag existed
# .NAME.[KIND-]PID-HOST-ID[SUFFIX]; legacy names lack HOST. A PID has at most 10 digits (os.kill takes a C int).
_TEMP_NAME = re.compile(r"^\..+\.(?:(?P<kind>part|probe|polygons)-)?(?P<pid>\d{1,10})-(?:(?P<host>[0-9a-f]{6})-)?"
                        r"[0-9a-f]{8}(?P<suffix>\.tmp|\.cog\.tif|\.tif)?$")
LEGACY_AGE_S = 3600  # a name without the host tag is removed only when its process is gone and it is this old


def temp_sibling(path: str | Path, kind: str = "", suffix: str = ".tmp") -> Path:
    """``.NAME.[KIND-]<pid>-<host>-<8 hex>SUFFIX`` in the folder of ``path``: a name no other write uses."""
    path = Path(path)
    tag = f"{kind}-" if kind else ""
    return path.with_name(f".{path.name}.{tag}{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:8]}{suffix}")


def remove_if_present(*paths: str | Path) -> None:
    """Delete these files where they exist (the clean-up of a write that did not finish)."""
    for p in paths:
        Path(p).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True when it cannot be told: a leftover is kept, not lost)."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: alive, another user's; a number no PID can be: unknown
        return True
    return True


def _pid_alive_windows(pid: int) -> bool:
    import ctypes

    kernel = ctypes.windll.kernel32
    handle = kernel.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel.GetLastError() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        return not kernel.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
    finally:
        kernel.CloseHandle(handle)


def _ours(name: str, is_dir: bool):
    """The match of a name mapseg writes (``TEMP_KINDS``: its kinds with their suffixes, a folder only for
    ``TEMP_FOLDER_KINDS``), or None: a user's ``.notes.1234-deadbeef`` or ``.photos.part-1-cafebabe`` is not."""
    m = _TEMP_NAME.match(name)
    if m is None:
        return None
    kind, suffix = m["kind"] or "", m["suffix"] or ""
    kinds = TEMP_KINDS if m["host"] is not None else LEGACY_KINDS
    if suffix not in kinds.get(kind, ()) or is_dir != (kind in TEMP_FOLDER_KINDS):
        return None
    return m


def remove_dead_leftovers(folder: str | Path) -> list[str]:
    """Remove the temporary files (and folders) that killed runs of this host left in ``folder``; their names.

    A name is removed when it is one ``temp_sibling`` gives for a kind mapseg writes (``_ours``), carries
    this host's tag and its process id is not alive here (names from before the host tag: also an hour
    old). Anything else, a live run's temporary and the user's own files above all, stays."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        m = _ours(entry.name, is_dir)
        if m is None or (m["host"] is not None and m["host"] != HOST_TAG) or pid_alive(int(m["pid"])):
            continue
        try:
            if m["host"] is None and now - entry.stat(follow_symlinks=False).st_mtime < LEGACY_AGE_S:
                continue
            if is_dir:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            continue  # gone already, or not ours to remove: leave it
    return removed


# Waits between tries of a move into place that the system refused (Windows: a file another program holds
# open, or a virus scanner or indexer reading it for a moment).
REPLACE_BACKOFF_S = (0.1, 0.25, 0.5, 1.0)


def _held_open(exc: OSError) -> bool:
    """Whether a failed move looks like a file held open by another program (or a scanner): worth a retry."""
    return isinstance(exc, PermissionError) or getattr(exc, "winerror", None) in (5, 32)


def replace_output(src: str | Path, dst: str | Path) -> None:
    """Move the finished temporary ``src`` over the output ``dst`` (``os.replace``). Where the system refuses
    because ``dst`` is held open (``PermissionError``; Windows errors 5 and 32: QGIS showing the layer, a
    virus scanner, an indexer) it tries again after ``REPLACE_BACKOFF_S``; if it still fails, ``src`` is
    removed, ``dst`` is left as it was and an ``OutputError`` says what to do. Other errors pass unchanged."""
    for wait in (*REPLACE_BACKOFF_S, None):
        try:
            os.replace(src, dst)
            return
        except OSError as exc:
            if not _held_open(exc):
                raise
            if wait is None:
                remove_if_present(src)
                raise OutputError(f"{dst} is open in another program (close it, or choose another output "
                                  "name); nothing was replaced") from exc
            time.sleep(wait)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a unique temporary sibling, then rename: never a half-written file. (Killed runs'
    leftovers are removed once per run, by ``check_outputs``, not here on every write.)"""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        tmp.write_bytes(data)
        replace_output(tmp, path)
    finally:
        remove_if_present(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (see ``write_bytes_atomic``)."""
    write_bytes_atomic(path, text.encode())


# --------------------------------------------------------------------------- checks before a run

def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same file by any path, symlink or hard link, or (where
    one does not exist yet) the same name in the same folder."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return _place(a) == _place(b)


def _place(p: str | Path) -> str:
    p = Path(p)
    return os.path.normcase(os.path.join(os.path.realpath(p.parent), p.name))


def _pairs(named) -> list:
    return list(named.items() if isinstance(named, dict) else named)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB" if n >= 1e3 else f"{n:,.0f} bytes"


def check_parent(path: str | Path, what: str) -> None:
    """``path`` names a file in an existing folder (not a folder itself); else an OutputError saying what to do."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder: give a file name")
    if not folder.exists():
        raise OutputError(f"{what} {path}: the output folder {folder} does not exist; create it first or choose "
                          "another")
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: {folder} is not a folder")


def check_folder(path: str | Path, what: str, need_bytes: int = 0) -> None:
    """``path`` can be written: its folder exists and takes a new file, it is not itself a folder, and
    (where the file system says) ``need_bytes`` fit. Raises OutputError saying what to do."""
    path = Path(path)
    folder = path.parent
    check_parent(path, what)
    probe = temp_sibling(path, "probe", "")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc}); "
                          "choose a folder you can write to") from exc
    remove_if_present(probe)
    if need_bytes > 0:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return  # not knowable here
        if free < need_bytes:
            raise OutputError(f"{what} {path}: {_mb(free)} free in {folder}, the output needs about "
                              f"{_mb(need_bytes)}; free some space or choose another folder")


def check_outputs(outputs, inputs, need_bytes: dict[str, int] | None = None) -> list[str]:
    """Before a run: refuse any output that is one of ``inputs`` or another output, or that cannot be
    written (``check_folder``); then remove dead runs' leftovers beside the outputs. ``outputs``: a dict
    or (what, path) pairs, what naming the output ("output", "--report"); ``inputs``: the same, what saying
    what would be lost ("the input raster", "the centres file"); None paths are skipped. ``need_bytes``
    gives an output's rough size by its what. Returns the leftovers removed (for the log)."""
    need_bytes = need_bytes or {}
    named = [(what, Path(p)) for what, p in _pairs(outputs) if p is not None]
    for i, (what, path) in enumerate(named):
        for src_what, src in _pairs(inputs):
            if src is not None and same_file(path, src):
                raise OutputError(f"{what} {path} is {src_what} ({src}): writing it would destroy it; "
                                  "choose another name")
        for other_what, other in named[:i]:
            if same_file(path, other):
                raise OutputError(f"{what} and {other_what} are both {path}: give them different names")
    for what, path in named:
        check_folder(path, what, need_bytes.get(what, 0))
    removed = []
    for folder in dict.fromkeys(os.path.realpath(path.parent) for _, path in named):
        removed += remove_dead_leftovers(folder)
    return removed
