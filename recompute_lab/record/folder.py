"""The run folder's record: one writer at a time, a record from the first second, and no finished
record lost.

- An exclusive lock (``fcntl.flock`` on ``.recompute_lab.lock`` in the run folder, released by the
kernel when the
  process dies) refuses a second run on the same folder with a clear message, before it writes
  anything.
- A run whose configuration, strategy options or resume checkpoint are refused writes nothing into a
folder
  that already holds a record (the old record stays); into an empty folder it writes an ``error``
  record, so a
  sweep shows the job.
- A folder whose results.json says ``ok`` holds a finished run: a new run there is refused (pick
another
  ``hydra.run.dir``); its results.json is never replaced.
- A record of any other status (interrupted, error, a ``running`` record left by a killed job) is
kept as
  ``results.previous-N.json`` before the new run's record replaces it.
- A folder holding a symlink (none is ever made by recompute_lab) is refused before anything is
  written: the log, ``.hydra/``, ``wandb/`` or a figure would otherwise be written where it points.
- Once the checks pass, a ``status: running`` record is written at once, so a job that is killed
(SIGKILL, node
  failure) still shows in ``analyze``; the analysis tells a live run from a dead one by the lock.
- The final record is never lost silently: when the folder cannot take it (disk full, folder made
  read-only), it goes to ``<run dir>.results.json`` beside the folder, and failing that to stderr as
  one JSON line; either way a message on stderr says where it went and why (RecordNotSaved).

Layer: record.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import sys
from pathlib import Path
from typing import Optional

from recompute_lab.config import ConfigError
from recompute_lab.record.fileio import describe_symlinks, planted_symlinks, remove_stale_temps
from recompute_lab.record.result import VALIDATE_ENV, RecordError, RunResult, validate
from recompute_lab.record.results import jsonable, write_json_atomic

RESULTS = "results.json"
LOCK = ".recompute_lab.lock"


class FolderBusy(ConfigError):
    """Another process is running in this run folder."""


class RecordNotSaved(RuntimeError):
    """The final record could not be written to the run folder's results.json; the message says
    where it went instead (the fallback file or stderr) and why."""


def fallback_path(folder: Path) -> Path:
    """Where a final record goes when its run folder cannot take it: beside the folder, named after
    it (a folder made unwritable still leaves its parent; another disk is not guessed at)."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.{RESULTS}"


def read_status(path: Path) -> Optional[str]:
    """The status of the results.json at ``path``: None if there is none, "unreadable" if it is not
    a record (nor a regular file: a FIFO would block the read). A ``running`` record whose final
    record went beside the folder (:func:`fallback_path`) reads as that one's status."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "unreadable"
    except FileNotFoundError:
        return None
    except OSError:
        return "unreadable"
    status = _record_status(path)
    spare = fallback_path(path.parent)
    if status == "running" and spare.is_file() and not is_locked(path.parent):
        return _record_status(spare)
    return status


def _record_status(path: Path) -> Optional[str]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return "unreadable"
    return str(data.get("status")) if isinstance(data, dict) else "unreadable"


def open_lock(path: Path):
    """The lock file opened for appending, or None when ``path`` is not a regular file (a FIFO
    would block the open for ever, a device or a symlink is not ours to write). Created if absent.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None  # checked before opening: the file type decides, not the open
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:  # ELOOP (a symlink planted meanwhile), ENXIO (a FIFO with no reader), ...
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "a")


def is_locked(folder: Path) -> bool:
    """Whether a live process holds the run folder's lock (a ``running`` record with no holder is a
    dead run). A lock path that is not a regular file is held by no run of ours: False."""
    path = Path(folder) / LOCK
    if not path.exists():
        return False
    f = open_lock(path)
    if f is None:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


class RunFolder:
    """The run folder of one process's run (see the module docstring for the rules)."""

    def __init__(self, folder: Path, write: bool = True):
        self.folder = Path(folder)
        self.write = write  # False on ranks other than 0 of a parallel run: they own no folder
        self._lock = None
        self.prior: Optional[str] = None

    def acquire(self) -> None:
        """Take the folder's lock and look at what it holds; raise FolderBusy / ConfigError, writing
        nothing."""
        if not self.write:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = open_lock(self.folder / LOCK)
        if lock is None:
            raise ConfigError(
                f"{self.folder / LOCK} is not a regular file (a FIFO, device, folder or symlink); "
                "remove it or choose another hydra.run.dir"
            )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise FolderBusy(
                f"another process is running in {self.folder} (it holds {LOCK}); wait for it or "
                "choose another hydra.run.dir"
            ) from None
        self._lock = lock
        links = planted_symlinks(self.folder) + planted_symlinks(self.folder / ".hydra")
        if links:
            raise ConfigError(
                f"{self.folder} holds symlinks that recompute_lab did not make "
                f"({describe_symlinks(links)}); a run never writes through one (its log, "
                ".hydra/, wandb/, figures would land where they point): remove them or choose "
                "another hydra.run.dir"
            )
        remove_stale_temps(self.folder, RESULTS)  # left by a write that a SIGKILL cut short
        self.prior = read_status(self.folder / RESULTS)
        if self.prior == "ok":
            raise ConfigError(
                f"{self.folder} holds a finished run (results.json status ok), kept as it is; "
                "choose another hydra.run.dir for a new run"
            )

    def refused(self, results: dict) -> None:
        """Record a run refused before it started: only where no earlier record would be
        replaced."""
        if (
            self.write
            and self.prior is None
            and self._lock is not None
            and not (self.folder / RESULTS).is_symlink()  # not ours: neither followed nor replaced
        ):
            self._write(results)

    def start(self, results: dict) -> None:
        """Keep an earlier record of another status beside, then write the ``running`` record."""
        if not self.write:
            return
        if self.prior is not None:
            n = 1
            while (self.folder / f"results.previous-{n}.json").exists():
                n += 1
            os.replace(self.folder / RESULTS, self.folder / f"results.previous-{n}.json")
            results["previous_record"] = f"results.previous-{n}.json (status {self.prior})"
        self._write({**results, "status": "running", "pid": os.getpid()})

    def finish(self, results: dict) -> Optional[str]:
        """Write the final record. Returns None when results.json took it, else a message saying
        where it went instead (printed on stderr here too): the fallback file beside the folder,
        or stderr as one JSON line when that fails as well."""
        if not self.write:
            return None
        data = self._record(results)
        try:
            write_json_atomic(self.folder / RESULTS, data)
            return None
        except Exception as e:  # not only OSError: whatever stops the write must not lose the run
            reason = f"{type(e).__name__}: {e}"
        data = {**data, "record_fallback": f"{self.folder / RESULTS} not written ({reason})"}
        spare = fallback_path(self.folder)
        try:
            write_json_atomic(spare, data)
            where = f"written to {spare} instead"
        except Exception as e:
            where = (
                f"and neither could {spare} ({type(e).__name__}: {e}); the record follows on "
                "stderr as one JSON line"
            )
            spare = None
        message = (
            f"recompute_lab: the final record (status {results.get('status')}) could not be "
            f"written to {self.folder / RESULTS} ({reason}); {where}"
        )
        print(message, file=sys.stderr, flush=True)
        if spare is None:
            print(json.dumps(data, allow_nan=False), file=sys.stderr, flush=True)
        return message

    def _write(self, results: dict) -> None:
        write_json_atomic(self.folder / RESULTS, self._record(results))

    def _record(self, results: dict) -> dict:
        """The record through its typed contract (recompute_lab.record.result.RunResult). A
        record that does not fit is still written, never lost, with the reason in
        ``record_error`` (tests make it an error)."""
        data = jsonable(results)
        try:
            data = RunResult.from_dict(data, str(self.folder / RESULTS)).to_dict()
            if os.environ.get(VALIDATE_ENV) == "1":
                validate(
                    data
                )  # the JSON Schema too (tests/conftest.py sets it for every test and CLI run)
        except RecordError as e:
            if os.environ.get(VALIDATE_ENV) == "1":
                raise
            data = {**data, "record_error": str(e)}
        return data

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
