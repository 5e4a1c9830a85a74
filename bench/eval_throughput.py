"""Frames/s of `moshi-eval librilight` end to end, through moshi's real loader, on a tiny checkpoint.

Writes the tiny checkpoint of the tests (config.json, safetensors LM and Mimi, sentencepiece tokenizer) and a
LibriLight-layout folder of `--books` books x 2 chapters (16 kHz FLAC) into a temporary directory, then runs
`moshi-eval librilight` on it twice (the second run must hit the code cache) and prints the runtime figures
of each `results.json`.

    python bench/eval_throughput.py [--books 3]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.checkpoint_factory import write_librilight_folder, write_tiny_checkpoint  # noqa: E402
from moshi_eval.cli import main as moshi_eval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_tiny_checkpoint(root / "checkpoint")
        seconds = [20 + 5 * i for i in range(2 * args.books)]
        audio = write_librilight_folder(root / "audio", books=args.books, chapters=2, seconds=seconds)
        for run in ("first run", "second run (same --out: resumes, nothing to score)",
                    "new --out, cached codes"):
            out = root / ("out2" if run.startswith("new") else "out")
            command = ["librilight", "--audio-dir", str(audio), "--out", str(out), "--cache-dir",
                       str(root / "cache"), "--threads", "1", "--no-progress"] + files["cli_args"]
            start = time.perf_counter()
            code = moshi_eval(command)
            wall = time.perf_counter() - start
            runtime = json.loads((out / "results.json").read_text())["runtime"]
            print(f"{run}: exit {code}, wall {wall:.1f} s, frames {runtime['frames']}, "
                  f"frames/s {runtime['frames_per_s']}, code cache {runtime['code_cache']}")


if __name__ == "__main__":
    main()
