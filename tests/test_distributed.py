"""`torchrun` over CPU processes (gloo): the books split across ranks give exactly the numbers of one process,
and a run whose process was killed resumes with another number of processes to the same numbers."""
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers.cli_helpers import make_world
from moshi_eval.files import report
from moshi_eval.cli.commands import main
from moshi_eval.distributed import assign

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
pytestmark = [pytest.mark.slow,     # subprocesses: most of the suite's time
              pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The conftest world with 5 one-chapter books, to split between ranks."""
    return make_world(tmp_path_factory.mktemp("dist"), books=5, chapters=1, seconds=[2.0, 3.5, 1.5, 3.0, 2.5], seed=3)


def _argv(world, out: Path, *extra: str) -> list[str]:
    return ["librilight", "--audio-dir", str(world["audio"]), "--out", str(out),
            "--cache-dir", str(world["root"] / "cache"), "--threads", "1", "--no-progress", "--batch-size", "2",
            "--bootstrap", "100", *world["ckpt"]["cli_args"], *extra]


def _torchrun(argv: list[str], processes: int) -> subprocess.Popen:
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node", str(processes), "-m", "moshi_eval",
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _same_results(a: Path, b: Path) -> None:
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["metrics"] == rb["metrics"]
    assert [x["sequence_id"] for x in ra["books"]] == [x["sequence_id"] for x in rb["books"]]
    for path in sorted((a / "sequences").glob("*.npz")):
        x, y = report.read_sequence(path), report.read_sequence(b / "sequences" / path.name)
        for name in report.SEQUENCE_ARRAYS:
            np.testing.assert_array_equal(x[name], y[name])


def test_split_is_deterministic_and_balanced():
    costs = [90, 10, 40, 40, 30, 80, 20]
    owners = assign(costs, 3)
    assert owners == assign(costs, 3)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(costs) and sorted(loads) == [100, 100, 110]
    assert assign(costs, 1) == [0] * len(costs)


def test_two_processes_equal_one(world, capsys):
    one, two = world["root"] / "one", world["root"] / "two"
    assert main(_argv(world, one)) == 0
    proc = _torchrun(_argv(world, two), 2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "[rank 1/2]" in err and "[rank 0/2]" in err      # both ranks scored books
    _same_results(one, two)
    results = json.loads((two / "results.json").read_text())
    assert results["runtime"]["processes"] == 2 and results["num_books"] == 5


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_killed_rank_then_resume_with_one_process(world):
    full, resumed = world["root"] / "full", world["root"] / "resumed"
    assert main(_argv(world, full, "--chunk", "1")) == 0
    proc = _torchrun(_argv(world, resumed, "--chunk", "1"), 2)
    deadline = time.time() + 120
    try:
        while not list((resumed / "sequences").glob("*.npz")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no book finished in time"
            time.sleep(0.01)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)                # one rank dies: torchrun stops the job
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    done = list((resumed / "sequences").glob("*.npz"))
    assert 1 <= len(done) < 5
    for path in done:
        report.read_sequence(path)                         # whole files only
    assert main(_argv(world, resumed, "--chunk", "1")) == 0
    _same_results(full, resumed)
