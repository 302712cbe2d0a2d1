"""Crash-safe file writes: a reader sees the old file or the complete new one, never a torn one.

Every write goes to a temp file in the destination's own folder (``.NAME.<random>.tmp``: same
filesystem, so the
rename is atomic), is flushed and fsync'ed, renamed over ``NAME`` with os.replace, and then the
folder is
fsync'ed so that the rename itself survives a power cut. If anything fails before the rename, the
temp file is
removed and the old ``NAME`` is untouched. A process killed mid-write (SIGKILL, OOM killer) cannot
clean up;
:func:`remove_stale_temps` deletes what such a write left behind, and nothing else.

Temp files are created with ``os.open(..., 0o666)``, so the kernel applies the umask (and any
default ACL)
exactly as for an ordinary ``open(path, "w")``; tempfile.mkstemp would create them 0600 and the
final file would
keep that mode.

A leaf module: standard library only, so that anything in the package can use it.

Layer: record, primitives (importable from every layer above config, predict and model).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "planted_symlinks",
    "remove_stale_temps",
    "temp_name_pattern",
]

# The random part of a temp name. [A-Za-z0-9_] also covers the names tempfile.mkstemp chose, which
# earlier
# versions of recompute_lab used for the same ``.NAME.*.tmp`` pattern.
_RANDOM_PART = r"[A-Za-z0-9_]{1,64}"


def temp_name_pattern(name: str) -> re.Pattern[str]:
    """The exact names of the temp files this module creates for destination file ``name``."""
    return re.compile(r"\." + re.escape(name) + r"\." + _RANDOM_PART + r"\.tmp")


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create and open a new, empty temp file next to ``path``; O_EXCL so it is never someone else's
    file."""
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_BINARY", 0)
    )
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp  # 0o666 & ~umask, as open(path, "w") would give
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temp file name found", str(path.parent))


def _fsync_file(path: Path) -> None:
    # Reopened because the writer may be a library that was handed only the path and has closed the
    # file.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Not possible on Windows (a directory cannot be opened
    there)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (certain network and FUSE mounts) do not support fsync on a directory at
        # all.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp file path next to ``path`` for a library to write to (e.g. ``torch.save(obj,
    tmp)``).

    On a clean exit the temp file is fsync'ed and renamed over ``path``, then the folder is
    fsync'ed. On any
    exception (KeyboardInterrupt included) the temp file is removed and ``path`` is left as it was.
    The folder
    must exist. The yielded file already exists, empty, with the final mode; write to it by path
    (truncating).
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring)."""
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically and durably (see the module docstring)."""
    atomic_write_bytes(path, text.encode(encoding))


def remove_stale_temps(folder: PathLike, name: str) -> list[Path]:
    """Delete the ``.NAME.<random>.tmp`` files a killed earlier write of ``folder/name`` left;
    return them.

    Only regular files whose whole name matches :func:`temp_name_pattern` are removed: never
    ``name`` itself,
    another file, a directory or a symlink. A write of the same file running concurrently in another
    process
    would lose its temp file, so call this only where one process owns the folder (a run directory).
    """
    folder = Path(folder)
    pattern = temp_name_pattern(name)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue  # gone meanwhile: nothing to clean
            removed.append(Path(entry.path))
    return removed


def planted_symlinks(folder: PathLike) -> list[Path]:
    """The symlinks directly inside ``folder`` (sorted). recompute_lab never makes one in a run or
    analysis folder, so each is someone else's: writing through it (a log, ``.hydra/``,
    ``wandb/``, a figure) would write wherever it points (issue 31). Callers refuse the folder."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(e.path) for e in entries if e.is_symlink())


def describe_symlinks(links: list[Path], limit: int = 3) -> str:
    """'a -> /x, b -> /y' for a message (the first ``limit``, then how many more)."""
    def target(p: Path) -> str:
        try:
            return os.readlink(p)
        except OSError:
            return "?"

    shown = ", ".join(f"{p.name} -> {target(p)}" for p in links[:limit])
    more = len(links) - limit
    return shown + (f" and {more} more" if more > 0 else "")
