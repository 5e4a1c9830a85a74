"""LikelihoodEvaluator and `moshi-eval likelihood` under `torchrun` (2 CPU processes, gloo): with the caller's
process group, each rank scores its share and every rank gets one process's numbers, the group is left usable;
an error on one rank (NaN weights; an unreadable file with --strict) is raised on every rank, none hangs."""
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint_factory import load_tiny_checkpoint, write_tiny_checkpoint
from moshi_eval import LikelihoodConfig, LikelihoodEvaluator
from test_likelihood import make_storycloze

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")
ENV = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")


def test_ranks_share_the_files_and_get_one_process_numbers(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    data = make_storycloze(tmp_path / "sc", stories=4)
    config = {"task": "sstorycloze", "data": str(data), "text": "zero", "batch_size": 2, "bootstrap": 100,
              "progress": False}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"ckpt": ckpt, "config": config}, default=str))
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).with_name("likelihood_torchrun.py")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), str(spec), str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm, mimi, _ = load_tiny_checkpoint(ckpt)
        alone = LikelihoodEvaluator(mimi, LikelihoodConfig(**config))(lm)
    finally:
        torch.set_num_threads(threads)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["mine"] for r in ranks)                                # each rank scored files
    assert sorted(ranks[0]["mine"] + ranks[1]["mine"]) == sorted(alone.scores)
    for r in range(2):
        assert ranks[r]["metrics"] == alone.metrics and "sstorycloze/accuracy" in alone.metrics
        assert ranks[r]["scores"] == {k: s.log_likelihood for k, s in alone.scores.items()}
        assert ranks[r]["initialized"] and ranks[r]["all_reduce"] == 6.0     # 3, then summed again
    assert ranks[1]["failure"].startswith("NonFiniteLossError")
    assert ranks[0]["failure"].startswith("RankFailedError") and "rank 1 failed while scoring" in ranks[0]["failure"]


def test_cli_strict_error_on_one_rank_is_raised_on_both(tmp_path):
    """`moshi-eval likelihood --strict` with one unreadable file, batches of one file: the rank that owns it
    fails with the file named, the other with RankFailedError naming it; both exit 1 within the timeout."""
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    data = make_storycloze(tmp_path / "sc", stories=3)
    (data / "1_uuid1ab_incorrect.wav").write_bytes(b"RIFF not really a wav")
    out = tmp_path / "run"
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "moshi_eval", "likelihood",
                           "--task", "sstorycloze", "--data", str(data), "--out", str(out), "--no-cache",
                           "--threads", "1", "--no-progress", "--text", "zero", "--batch-size", "1", "--strict",
                           *ckpt["cli_args"]], capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode != 0
    err = proc.stderr
    assert "1_uuid1ab_incorrect.wav" in err
    errors = [line for line in err.splitlines() if "moshi-eval: error:" in line]
    assert len(errors) == 2, err[-3000:]
    assert sum("failed while scoring" in line for line in errors) == 1
    assert not (out / "results.json").exists()
