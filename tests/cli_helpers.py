"""Running `moshi-eval` in a subprocess for the tests that signal it."""
import os
from pathlib import Path
import signal
import subprocess
import sys
import time


def sigterm_after_first_book(argv: list[str], out: Path, timeout: float = 120) -> tuple[int, str]:
    """Run `python -m moshi_eval *argv`, send SIGTERM as soon as a book file appears in `out/sequences`,
    and return the exit code and stderr."""
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    proc = subprocess.Popen([sys.executable, "-m", "moshi_eval", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + timeout
    try:
        while not list((out / "sequences").glob("*.npz")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no book finished in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err
