"""Content hashes of files, computed once: what a run's numbers depend on, checked on every resume.

A weight file or an audio chapter replaced at the same path (even with the same size) must not be mistaken
for the one a finished result came from, so identities carry the sha256 of the content. Hashing a 15 GB
checkpoint takes a minute: the digest is cached on disk per (path, size, mtime, inode, inode change time),
one small JSON file per path (`<root>/<sha1(path)>.json`, written atomically, so concurrent runs never leave a
broken entry). The mtime alone is not enough: `touch -d` or `cp -p` sets it back after a file is replaced,
while the inode change time (`st_ctime_ns`) is set by the kernel on every write or rename and no user call sets
it back, and a replaced file usually has another inode.
"""
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from ..files.atomic import atomic_write

logger = logging.getLogger(__name__)


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 hex digest of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def _stamp(path: Path, st: os.stat_result) -> tuple[str, int, int, int, int]:
    """What a cached digest is valid for: path, size, mtime, inode and inode change time."""
    return (os.fsdecode(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


_STAMP_KEYS = ("path", "size", "mtime_ns", "ino", "ctime_ns")


def _path_key(path: Path) -> str:
    return hashlib.sha1(os.fsencode(path)).hexdigest()


class FileHasher:
    """sha256 of files by content, cached in memory and (with a `root`) on disk by path, size, mtime, inode
    and inode change time (`_stamp`).

    An unusable cache folder (a file, read-only, full) is reported once and the hasher goes on without it.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = None if root is None else Path(root)
        self._memo: dict[tuple[str, int, int, int, int], str] = {}

    def identity(self, path: str | Path) -> dict:
        """`{"path", "size", "mtime_ns", "sha256"}` of `path` (resolved). Raises OSError if unreadable."""
        path = Path(path).resolve()
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):      # /dev/zero would be hashed forever, a FIFO would block
            raise OSError(f"{path}: not a regular file")
        return {"path": os.fsdecode(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "sha256": self.sha256(path, st)}

    def sha256(self, path: Path, st: os.stat_result) -> str:
        stamp = _stamp(path, st)
        if stamp in self._memo:
            return self._memo[stamp]
        digest = self._read(path, stamp)
        if digest is None:
            digest = file_sha256(path)
            self._write(path, stamp, digest)
        self._memo[stamp] = digest
        return digest

    def _entry(self, path: Path) -> Path | None:
        return None if self.root is None else self.root / f"{_path_key(path)}.json"

    def _read(self, path: Path, stamp: tuple[str, int, int, int, int]) -> str | None:
        entry = self._entry(path)
        if entry is None:
            return None
        try:
            data = json.loads(entry.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or [data.get(k) for k in _STAMP_KEYS] != list(stamp):
            return None
        digest = data.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def _write(self, path: Path, stamp: tuple[str, int, int, int, int], digest: str) -> None:
        entry = self._entry(path)
        if entry is None:
            return
        text = json.dumps(dict(zip(_STAMP_KEYS, stamp), sha256=digest))
        try:
            atomic_write(entry, lambda f: f.write(text.encode()))
        except OSError as exc:
            logger.warning("hash cache %s unusable (%s): going on without it", self.root, exc)
            self.root = None
