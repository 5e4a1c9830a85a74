"""The output folder of a run, with one owner: `OutputFolder` for the run that writes it, `RunFolder` for a reader.

Every task (LibriLight, likelihood, dialogues) writes its folder through these rules, so that no result is lost
or mixed:
- one run at a time: an exclusive `fcntl` lock (`lock.OutputLock`) held for the whole run, taken before anything
  is read or written there; a reader (`compare`, `loggers.log_run`) takes a shared one;
- temporaries of a write killed midway (`.<name>.*.tmp`, see `atomic.atomic_write`) are removed, in every
  subfolder, once the lock is held;
- `config.json` holds the task and what its numbers depend on (model identity included): a folder of another
  task or configuration is refused with the differing keys (`ConfigMismatchError`);
- every resume unit (a book file, a batch file) carries its origin (`origin()`: the digest of that configuration
  and the model identity) and a checksum of its values; `why_not_reusable` tells whether a unit can be reused;
- the final files are written first and `results.json` last, naming their sha256 (`write_results`): a run killed
  between them leaves a `results.json` that does not match its files, which `RunFolder` refuses to read;
- a write that fails (full disk, read-only folder) is a `ReportError` naming the file.
"""
import hashlib
import json
import os
from pathlib import Path
import typing as tp

from ..errors import MoshiEvalError
from ..scoring import SCORING_VERSION
from .atomic import atomic_write, json_form, json_safe
from .hashing import file_sha256
from .lock import OutputBusyError, OutputLock, SharedLock

CONFIG_JSON = "config.json"
RESULTS_JSON = "results.json"
# Where each task keeps its resume units: a folder holding one of them is a run with results to protect.
UNIT_GLOBS = ("sequences/*.npz", "items/batch_*.json", "dialogues/batch_*.npz")


class ReportError(MoshiEvalError, ValueError):
    """An output folder that cannot be used or read (a write that fails, a corrupt or stale file)."""


class ConfigMismatchError(ReportError):
    """The output folder holds results of another task or configuration."""


def write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic.atomic_write` of `data`; a failure (read-only or full disk) is a ReportError naming the file: what
    was written before stays whole."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}. The files written before are intact; "
                          "free space or fix the permissions and rerun the same command to resume.") from exc


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: tp.Any) -> None:
    write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def digest(value: tp.Any) -> str:
    """sha256 of a JSON value in the form it takes on disk (keys sorted): the digest of a configuration."""
    return hashlib.sha256(json.dumps(json_form(value), sort_keys=True).encode()).hexdigest()


def differences(a: tp.Any, b: tp.Any, prefix: str = "") -> list[tuple[str, tp.Any, tp.Any]]:
    """The leaves where two JSON values differ, as (dotted key, value in a, value in b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            found += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return found
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def _format_differences(stored: tp.Any, now: tp.Any) -> str:
    return "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, a, b in differences(stored, now)[:5])


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries (`.<name>.*.tmp`) that writes killed midway left anywhere under `path`. Call it
    under the folder's exclusive lock only: a running run's temporaries are not stale. Returns what was removed."""
    removed = []
    root = Path(path)
    if not root.is_dir():
        return removed
    for tmp in root.rglob(".*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def has_units(path: str | Path) -> bool:
    """Whether `path` holds results worth protecting: a results.json or any task's resume unit."""
    root = Path(path)
    return (root / RESULTS_JSON).is_file() or any(next(root.glob(g), None) is not None for g in UNIT_GLOBS)


class OutputFolder:
    """The folder a run writes (`with OutputFolder(out, "librilight", command) as folder:`).

    Entering it creates the folder, takes its lock and removes stale temporaries; `check_config` then stores or
    checks `config.json`. Only the process that entered it (rank 0 of a torchrun job) writes `config.json` and
    `results.json`; resume units may be written by every rank (`write_unit`: atomic, named on failure).

    Args:
        path: the folder (`--out`).
        task: the task name recorded in `config.json` and `results.json` (`librilight`, `likelihood`, ...).
        command: what the lock file says holds the folder (the command line, or the library call).
    """

    def __init__(self, path: str | Path, task: str, command: str = "") -> None:
        self.path = Path(path)
        self.task = task
        self.command = command
        self.config: dict | None = None
        self.config_sha256: str | None = None
        self._lock: OutputLock | None = None

    def __enter__(self) -> "OutputFolder":
        if self.path.exists() and not self.path.is_dir():
            raise ReportError(f"--out {self.path} exists and is not a directory.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportError(f"--out {self.path}: cannot create the folder: {exc.strerror or exc}.") from exc
        lock = OutputLock(self.path, self.command)
        lock.__enter__()
        self._lock = lock
        try:
            remove_stale_temporaries(self.path)
        except OSError as exc:
            self.__exit__(None, None, None)
            raise ReportError(f"--out {self.path}: cannot clean the temporaries of a killed run: {exc}.") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def check_config(self, config: dict) -> bool:
        """Store `{"task": task, "scoring_version": SCORING_VERSION, **config}` in `config.json`, or check it
        equals the stored one (units scored by another version of the scoring path are never mixed in).

        Returns True when the folder already holds this configuration (a resume). A stored configuration
        without any result (a run that failed early) is replaced.
        Raises ConfigMismatchError: the folder holds a run of another task or configuration (names the keys),
        or results without a `config.json`.
        """
        if "task" in config or "scoring_version" in config:
            raise ValueError("config: the keys 'task' and 'scoring_version' are the folder's own")
        full = json_form({"task": self.task, "scoring_version": SCORING_VERSION, **config})
        self.config, self.config_sha256 = full, digest(full)
        path = self.path / CONFIG_JSON
        protected = has_units(self.path)
        if not protected:
            # Nothing to protect (new folder, or a run that failed before its first result): start afresh.
            write_json(path, full)
            return False
        if not path.is_file():
            raise ConfigMismatchError(f"--out {self.path} holds results but no {CONFIG_JSON}: they cannot be "
                                      "attributed to a configuration. Use another --out.")
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ReportError(f"cannot read {path}: {exc}. Use another --out, or delete the folder.") from exc
        stored_task = stored.get("task", "librilight") if isinstance(stored, dict) else None
        if stored_task != self.task:
            raise ConfigMismatchError(f"--out {self.path} holds a {stored_task} run, and this is a {self.task} run: "
                                      "use another --out (nothing was changed there).")
        if stored.get("scoring_version") != SCORING_VERSION and \
                {k: v for k, v in stored.items() if k != "scoring_version"} == \
                {k: v for k, v in full.items() if k != "scoring_version"}:
            raise ConfigMismatchError(
                f"--out {self.path} holds results of an earlier version of the scoring (scoring_version "
                f"{stored.get('scoring_version', 1)}, now {SCORING_VERSION}), whose numbers differ from this one's "
                "at float rounding level: they are not mixed. Use another --out for this version (compare works "
                "across them).")
        if stored != full:
            raise ConfigMismatchError(f"--out {self.path} holds results of another configuration "
                                      f"({_format_differences(stored, full)}). Use another --out, or delete "
                                      f"{self.path} to start over.")
        return True

    def origin(self) -> dict:
        """What a resume unit records of where it comes from: the configuration digest and the model identity."""
        if self.config_sha256 is None:
            raise RuntimeError("OutputFolder.origin() before check_config()")
        return {"config_sha256": self.config_sha256, "model": tp.cast(dict, self.config).get("model")}

    def why_not_reusable(self, origin: tp.Any, recorded_checksum: tp.Any, checksum: str) -> str | None:
        """Why a unit with this recorded `origin` and values `checksum` cannot be reused here (None: it can)."""
        if not isinstance(origin, dict) or origin.get("config_sha256") != self.config_sha256:
            return ("its file was scored under another configuration (another model, options...) or comes from "
                    "another run")
        if recorded_checksum != checksum:
            return "its values do not match the checksum written with them (edited or corrupt)"
        return None

    def write_unit(self, relative: str | Path, data: bytes) -> Path:
        path = self.path / relative
        write_bytes(path, data)
        return path

    def write_results(self, results: dict, files: tp.Mapping[str, bytes | tp.Callable[[Path], None]]) -> Path:
        """Write the final `files` (relative path -> bytes, or a function writing that path atomically) first,
        then `results.json` with `task` and `files` (their sha256) added. Returns the path of results.json."""
        for name, content in files.items():
            path = self.path / name
            if callable(content):
                content(path)
            else:
                write_bytes(path, content)
        document = {"task": self.task, **results}
        document["files"] = {name: file_sha256(self.path / name) for name in files}
        path = self.path / RESULTS_JSON
        write_json(path, document)
        return path


class RunFolder:
    """A finished run, read at rest: `with RunFolder(path) as run:` takes the shared lock (refused, naming the
    holder, while a run writes the folder), reads `results.json` and checks that every final file it names has
    the sha256 it recorded (a run killed between its final writes, or a file replaced since, is refused).

    Attributes: `path`, `results` (the document), `task` (`librilight` for runs that predate the key).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results: dict = {}
        self._lock = SharedLock(self.path)

    @property
    def task(self) -> str:
        return self.results.get("task") or ("likelihood" if "accuracy" in self.results else "librilight")

    def __enter__(self) -> "RunFolder":
        try:
            self._lock.__enter__()
        except OutputBusyError as exc:
            raise ReportError(f"{self.path}: {exc}") from None
        try:
            self._read()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(None, None, None)

    def _read(self) -> None:
        path = self.path / RESULTS_JSON
        try:
            self.results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ReportError(f"{self.path}: not a finished run ({path}: {exc}).") from exc
        if not isinstance(self.results, dict):
            raise ReportError(f"{self.path}: not a finished run ({path} is not a JSON object).")
        for name, expected in (self.results.get("files") or {}).items():
            self.check_file(name, expected)

    def check_file(self, name: str, expected: str | None) -> Path:
        """The file `name` of the run, checked against the sha256 results.json recorded for it."""
        file = self.path / name
        try:
            actual = file_sha256(file)
        except OSError as exc:
            raise ReportError(self.stale(file, f"cannot read it: {exc.strerror or exc}")) from exc
        if expected is not None and actual != expected:
            raise ReportError(self.stale(file, f"sha256 {actual[:12]}..., results.json lists {expected[:12]}..."))
        return file

    def stale(self, file: Path, why: str) -> str:
        return (f"{self.path}: results.json does not match {file} ({why}): the run was changed after results.json "
                "was written (an interrupted rescoring?). Rerun that run's command in the same --out to finish it.")


def folder_command(path: str | Path, call: str) -> str:
    """What the lock file says of a library call that writes `path`."""
    return f"moshi_eval.{call}({os.fsdecode(path)!r})"


__all__ = ["CONFIG_JSON", "ConfigMismatchError", "OutputFolder", "RESULTS_JSON", "ReportError", "RunFolder", "digest",
           "differences", "has_units", "remove_stale_temporaries", "write_bytes", "write_json", "write_text"]
