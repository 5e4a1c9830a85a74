"""The one runner of every task into an output folder: what `moshi-eval librilight`, `likelihood`, `dialogues` and
`demo` do around the library's evaluators.

`run_task(TaskRun(...))`, for any task (`LibriLightTask`, `LikelihoodTask`, `DialogueTask`):
- SIGTERM is turned into KeyboardInterrupt for the run; either stops it between two streaming calls, every
  finished unit (book, batch) intact, and prints the command that resumes it (exit code 130);
- torch CPU threads are set for the run (`RunConfig.threads`) and restored after;
- under torchrun every rank joins the process group (`distributed.from_environment`), and leaves it at the end
  unless the caller's own group was already there;
- rank 0 opens the output folder (`OutputFolder`: lock, stale temporaries, `config.json` with the task and the
  model identity) before the model is loaded; every rank learns the outcome (an error stops them all);
- the model is loaded, the task's evaluator built from its codec, and called once with the folder's store: units
  finished by an earlier run of the same configuration are read back, the others scored and written as they are;
- rank 0 writes the result's files, `results.json` last, and prints its summary; the ranks meet at a barrier.
"""
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
import shlex
import signal
import sys
import threading
import typing as tp

import torch

from .. import distributed
from ..checkpoint import LoadedCheckpoint
from ..errors import EXIT_INTERRUPTED
from ..files.folder import OutputFolder
from ..files.hashing import FileHasher


class Task(tp.Protocol):
    """A task as the runner runs it (see `tasks.base`)."""
    name: str
    unit: str          # what a resume unit is: "book", "batch"
    units_dir: str     # the subfolder of the output folder that holds them

    def identity(self, device: str | torch.device) -> dict: ...

    def evaluator(self, mimi: tp.Any, ranks: distributed.Ranks, cache_dir: Path | None, hasher: FileHasher,
                  progress: bool) -> tp.Any: ...

    def store(self, folder: OutputFolder, ranks: distributed.Ranks) -> tp.Any: ...


@dataclass
class TaskRun:
    """Everything `run_task` needs, whatever the task and the source of the model.

    Attributes:
        task: the task (`LibriLightTask`, `LikelihoodTask`, `DialogueTask`).
        out: the output folder.
        load: loads the model and codec (called once the folder is locked and its configuration checked).
        identity: what identifies the model in config.json and results.json.
        device: where the model runs (its kind is part of the identity of the numbers).
        argv: the command line, recorded and printed to resume (`moshi-eval ` + argv).
        cache_dir: the Mimi code cache (None: no cache); `hasher`: content hashes of weights and audio.
        threads: torch CPU threads for the run (None: unchanged). progress: tqdm bars.
        after: what to do with the result on rank 0 once its files are written (the loggers).
    """
    task: Task
    out: Path
    load: tp.Callable[[], LoadedCheckpoint]
    identity: dict
    device: str | torch.device | None = "cpu"
    argv: list[str] = field(default_factory=list)
    cache_dir: Path | None = None
    hasher: FileHasher = field(default_factory=FileHasher)
    threads: int | None = None
    progress: bool = True
    after: tp.Callable[[tp.Any], None] | None = None


def command_line(argv: tp.Sequence[str]) -> str:
    return "moshi-eval " + shlex.join(list(argv))


def raise_interrupt(signum: int, frame: tp.Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@tp.overload
def run_task(run: TaskRun) -> int: ...
@tp.overload  # noqa: E302
def run_task(run: TaskRun, keep_result: tp.Literal[True]) -> tuple[int, tp.Any]: ...


def run_task(run, keep_result=False):  # noqa: E302
    """Run `run.task` into `run.out`. Returns the exit code (and, with `keep_result`, the result: None on an
    interrupt)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    threads = torch.get_num_threads()
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ranks = distributed.Ranks()
    result = None
    try:
        ranks = distributed.from_environment()
        with ExitStack() as stack:
            folder = OutputFolder(run.out, run.task.name, command_line(run.argv))
            _open(folder, run, ranks, stack)
            ckpt = run.load()
            evaluator = run.task.evaluator(ckpt.mimi, ranks, run.cache_dir, run.hasher, run.progress)
            result = evaluator(ckpt.lm_model, run.task.store(folder, ranks))
            if ranks.is_main:
                result.write_files(folder, command_line(run.argv), run.identity)
                result.print_summary(run.out)
            ranks.barrier()
        if ranks.is_main and run.after is not None:    # the folder released: a reader (the loggers) may read it
            run.after(result)
        code = 0
    except KeyboardInterrupt:
        units = Path(run.out) / run.task.units_dir
        n = sum(1 for p in units.iterdir() if not p.name.startswith(".")) if units.is_dir() else 0
        print(f"\nmoshi-eval: {ranks.tag}interrupted. {n} finished {run.task.unit}(s) are saved in {units}. Resume "
              f"with the same command:\n  {command_line(run.argv)}", file=sys.stderr)
        code, result = EXIT_INTERRUPTED, None
    finally:
        if owned:
            ranks.close()
        torch.set_num_threads(threads)     # main() may be called in-process (tests, notebooks)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return (code, result) if keep_result else code


def _open(folder: OutputFolder, run: TaskRun, ranks: distributed.Ranks, stack: ExitStack) -> None:
    """Rank 0 enters the folder (for the whole run) and checks its configuration; every rank learns the outcome
    (an error stops them all with the same message) and the configuration digest its units record."""
    outcome: tuple[tp.Any, BaseException | None] = (None, None)
    if ranks.is_main:
        try:
            stack.enter_context(folder)
            from ..checkpoint import resolve_device
            config = {"model": run.identity, **run.task.identity(resolve_device(
                None if run.device is None else str(run.device)))}
            folder.check_config(config)
            outcome = ((folder.config, folder.config_sha256), None)
        except Exception as exc:
            outcome = (None, exc)
    state, error = ranks.broadcast(outcome)
    if error is not None:
        raise error
    folder.config, folder.config_sha256 = state


__all__ = ["Task", "TaskRun", "command_line", "raise_interrupt", "run_task"]
