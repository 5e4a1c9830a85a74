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

from checkpoint_factory import load_tiny_checkpoint, write_librilight_folder, write_tiny_checkpoint
from moshi_eval import LibriLightConfig, LibriLightEvaluator

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")


def test_ranks_share_the_books_and_get_one_process_metrics(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    audio = write_librilight_folder(tmp_path / "libri", books=3, chapters=1, seconds=[2.0, 3.0, 1.5], seed=5)
    config = {"audio_dir": str(audio), "batch_size": 1, "report_at": [10, 30], "report_window": 5, "bucket": 10,
              "bootstrap": 200}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"ckpt": ckpt, "config": config, "cache": str(tmp_path / "cache")}, default=str))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("evaluator_torchrun.py")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), str(spec), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm, mimi, _ = load_tiny_checkpoint(ckpt)
        alone = LibriLightEvaluator(mimi, LibriLightConfig(**config), use_cache=False)(lm)
    finally:
        torch.set_num_threads(threads)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["mine"] for r in ranks)                                # each rank scored books
    assert sorted(ranks[0]["mine"] + ranks[1]["mine"]) == sorted(alone.sequences)
    for r in range(2):
        assert ranks[r]["metrics"] == alone.metrics
        assert ranks[r]["initialized"] and ranks[r]["all_reduce"] == 6.0     # 3, then summed again
        with np.load(out / f"rank{r}.npz") as arrays:
            assert len(arrays.files) == 4 * len(alone.sequences)
            for key in arrays.files:
                sid, name = key.split("|")
                np.testing.assert_array_equal(arrays[key], alone.sequences[sid][name])
    assert ranks[1]["failure"].startswith("NonFiniteLossError")
    assert ranks[0]["failure"].startswith("RankFailedError") and "rank 1 failed while scoring" in ranks[0]["failure"]
