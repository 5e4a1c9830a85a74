"""The command line on top of the library: only cli.py sees parsed arguments; check-streaming --threads."""
from pathlib import Path
import re

import torch

from moshi_eval.cli.commands import main

EVAL = Path(__file__).resolve().parents[1] / "moshi_eval"


def test_only_cli_sees_an_argparse_namespace():
    users = sorted(str(p.relative_to(EVAL)) for p in EVAL.rglob("*.py") if "cli" not in p.relative_to(EVAL).parts
                   and re.search(r"argparse\.Namespace|\bargs\.\w+\s*=(?!=)", p.read_text()))
    assert users == []


def test_check_streaming_threads(capsys):
    threads = torch.get_num_threads()
    assert main(["check-streaming", "--demo", "--frames", "6", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads                  # set for the run, restored after
    assert "CONSISTENT" in capsys.readouterr().out
    assert main(["check-streaming", "--demo", "--frames", "6", "--threads", "0"]) == 2
    assert "threads (--threads): expected a positive integer or None, got 0" in capsys.readouterr().err
