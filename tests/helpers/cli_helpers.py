"""Running `moshi-eval` in a subprocess for the tests that signal it."""
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
import typing as tp


def sigterm_after_first_book(argv: list[str], out: Path, timeout: float = 120) -> tuple[int, str]:
    """Run `python -m moshi_eval *argv`, send SIGTERM as soon as a book file appears in `out/sequences`,
    and return the exit code and stderr."""
    return sigterm_after_first(argv, out, "sequences/*.npz", timeout)


def sigterm_after_first(argv: list[str], out: Path, pattern: str, timeout: float = 120) -> tuple[int, str]:
    """Run `python -m moshi_eval *argv`, send SIGTERM as soon as a file matching `pattern` (a glob below `out`:
    a finished book, a finished batch) appears, and return the exit code and stderr."""
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "moshi_eval", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + timeout
    try:
        while not list(out.glob(pattern)):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, f"no {pattern} in {out} in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


FAST = ["--threads", "1", "--no-progress"]


def make_world(root: Path, **folder: tp.Any) -> dict:
    """The tiny checkpoint and a LibriLight-layout folder: by default 3 books of different lengths (about 56,
    38 and 44 frames), 2 chapters each; `folder` overrides the arguments of `write_librilight_folder`."""
    from .checkpoint_factory import write_librilight_folder, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(root / "ckpt")
    folder = dict(dict(books=3, chapters=2, seconds=[2.5, 2.0, 1.5, 1.5, 3.0, 0.5]), **folder)
    audio = write_librilight_folder(root / "libri", **folder)
    return {"root": root, "ckpt": ckpt, "audio": audio, "cache": root / "cache"}


def librilight_args(world: dict, out: Path, *extra: str, audio: Path | None = None,
                    ckpt_args: list[str] | None = None) -> list[str]:
    return ["librilight", "--audio-dir", str(audio or world["audio"]), "--out", str(out),
            "--cache-dir", str(world["cache"]), *FAST, *(ckpt_args or world["ckpt"]["cli_args"]), *extra]


def results(out: Path) -> dict:
    import json
    return json.loads((Path(out) / "results.json").read_text())


def sequences(out: Path) -> dict:
    from moshi_eval.files import report
    return {p.stem: report.read_sequence(p) for p in sorted((Path(out) / "sequences").glob("*.npz"))}
