"""The command line on top of the library: only cli.py sees parsed arguments; check-streaming --threads."""
from pathlib import Path
import re

import torch

from moshi_eval.cli import main

EVAL = Path(__file__).resolve().parents[1] / "eval"


def test_only_cli_sees_an_argparse_namespace():
    users = sorted(p.name for p in EVAL.glob("*.py") if p.name != "cli.py"
                   and re.search(r"argparse\.Namespace|\bargs\.\w+\s*=(?!=)", p.read_text()))
    assert users == []


def test_check_streaming_threads(capsys):
    threads = torch.get_num_threads()
    assert main(["check-streaming", "--demo", "--frames", "6", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads                  # set for the run, restored after
    assert "CONSISTENT" in capsys.readouterr().out
    assert main(["check-streaming", "--demo", "--frames", "6", "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
