"""The evaluator inside a `torchrun` job (2 CPU processes, gloo) whose script initialised the process group:
each rank scores its share, every rank returns the metrics of one process, the group is left usable, and a
failure on one rank is raised on every rank."""
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers.checkpoint_factory import load_tiny_checkpoint, write_librilight_folder, write_tiny_checkpoint
from moshi_eval import LibriLightConfig, LibriLightEvaluator

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
pytestmark = [pytest.mark.slow,     # subprocesses: most of the suite's time
              pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")]


def _run_script(tmp_path, spec: dict) -> list[dict]:
    """tests/evaluator_torchrun.py under torchrun, 2 processes: each rank's summary."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec, default=str))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("helpers") / "evaluator_torchrun.py"
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), str(path), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _check_ranks(tmp_path, ranks: list[dict], alone_metrics: dict, alone_arrays: dict) -> None:
    """Each rank scored a share, got one process's metrics and arrays, kept the group, and the failure on rank
    1 (NaN weights) was raised on both."""
    assert all(r["mine"] for r in ranks)
    assert sorted(ranks[0]["mine"] + ranks[1]["mine"]) == sorted(alone_arrays)
    for r in range(2):
        assert ranks[r]["metrics"] == alone_metrics
        assert ranks[r]["initialized"] and ranks[r]["all_reduce"] == 6.0     # 3, then summed again
        with np.load(tmp_path / "out" / f"rank{r}.npz") as arrays:
            assert len(arrays.files) == sum(len(a) for a in alone_arrays.values())
            for key in arrays.files:
                sid, name = key.split("|")
                np.testing.assert_array_equal(arrays[key], alone_arrays[sid][name])
    assert ranks[1]["failure"].startswith("NonFiniteLossError")
    assert ranks[0]["failure"].startswith("RankFailedError") and "rank 1 failed while scoring" in ranks[0]["failure"]


def _alone(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_ranks_share_the_books_and_get_one_process_metrics(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    audio = write_librilight_folder(tmp_path / "libri", books=3, chapters=1, seconds=[2.0, 3.0, 1.5], seed=5)
    config = {"audio_dir": str(audio), "batch_size": 1, "report_at": [10, 30], "report_window": 5, "bucket": 10,
              "bootstrap": 200}
    ranks = _run_script(tmp_path, {"ckpt": ckpt, "config": config, "cache": str(tmp_path / "cache")})

    def alone():
        lm, mimi, _ = load_tiny_checkpoint(ckpt)
        return LibriLightEvaluator(mimi, LibriLightConfig(**config), use_cache=False)(lm)
    result = _alone(alone)
    _check_ranks(tmp_path, ranks, result.metrics, result.sequences)


def test_likelihood_ranks_share_the_files_and_get_one_process_numbers(tmp_path):
    from moshi_eval import LikelihoodConfig, LikelihoodEvaluator
    from test_likelihood import make_storycloze
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    data = make_storycloze(tmp_path / "sc", stories=4)
    config = {"task": "sstorycloze", "data": str(data), "text": "zero", "batch_size": 2, "bootstrap": 100,
              "progress": False}
    ranks = _run_script(tmp_path, {"ckpt": ckpt, "config": config, "likelihood": True})

    def alone():
        lm, mimi, _ = load_tiny_checkpoint(ckpt)
        return LikelihoodEvaluator(mimi, LikelihoodConfig(**config))(lm)
    result = _alone(alone)
    assert "sstorycloze/accuracy" in result.metrics
    _check_ranks(tmp_path, ranks, result.metrics,
                 {k: {"log_likelihood": np.float64(s.log_likelihood)} for k, s in result.scores.items()})
