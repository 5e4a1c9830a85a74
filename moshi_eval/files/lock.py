"""One run at a time per output folder: an `fcntl` lock on `<out>/.moshi-eval.lock`, held for the run.

Two runs writing one `--out` would mix their books and overwrite each other's `results.json`. The second
run fails at once with the pid, start time and command of the first, which the lock file holds. The lock
belongs to the open file: the kernel releases it when its process dies, however it dies, so the lock of a
dead run is simply taken over by the next one (no stale lock to clean by hand).
"""
import datetime
import fcntl
import json
import os
from pathlib import Path

from ..errors import MoshiEvalError

LOCK_NAME = ".moshi-eval.lock"


class OutputBusyError(MoshiEvalError, RuntimeError):
    """Another run holds the output folder."""


class OutputLock:
    """`with OutputLock(out, command):` holds `<out>/.moshi-eval.lock` (created if needed)."""

    def __init__(self, out: Path, command: str) -> None:
        self.path = Path(out) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputBusyError(f"cannot create the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputBusyError(
                f"--out {self.path.parent} is in use by another moshi-eval run ({holder}). Wait for it to "
                "finish, or use another --out.") from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": self.command}
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)     # Releases the lock; the file stays, harmless, for the next run.
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16).decode() or "{}")
        return f"pid {info['pid']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


class SharedLock:
    """`with SharedLock(out):` a shared lock on `<out>/.moshi-eval.lock` while a reader (compare) reads the
    folder: it fails at once, naming the run, while a run holds the folder, and a run that starts meanwhile
    waits for nothing: it fails as on any busy folder. A folder without a lock file (never run, or read-only
    copy) is read without a lock."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "SharedLock":
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputBusyError(f"a moshi-eval run is writing this folder ({holder}): its books and "
                                  "results.json are changing. Wait for it to finish.") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
