"""Paired comparison of finished runs (`moshi-eval compare`): LibriLight runs (`compare.librilight`) on the books
they share, likelihood runs (`compare.likelihood`) on the pairs they share. Every run is read through
`files.folder.RunFolder` (shared lock, its files as results.json recorded them); runs of different tasks are
refused, naming each run's task."""
from pathlib import Path

from ..files.folder import ReportError, RunFolder
from .librilight import CompareError


def run_tasks(paths: list[Path]) -> list[str]:
    """The task of each run (`librilight`, `likelihood`, `dialogue`), read at rest; CompareError if a run is not a
    finished run, or if the runs are not all of one task (naming each)."""
    tasks = []
    for path in paths:
        try:
            with RunFolder(path) as run:
                tasks.append(run.task)
        except ReportError as exc:
            raise CompareError(str(exc)) from None
    if len(set(tasks)) > 1:
        named = ", ".join(f"{p} is a {t} run" for p, t in zip(paths, tasks))
        raise CompareError(f"runs of different tasks cannot be compared: {named}.")
    return tasks


__all__ = ["CompareError", "run_tasks"]
