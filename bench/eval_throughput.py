"""Frames/s of `moshi-eval` end to end on the embedded demo (seeded Moshi-shaped LM and Mimi, the shipped
audiobook): a first run, a second run into the same `--out` (resumes: nothing to score) and a run into a new
`--out` (the code cache hit), each with the runtime figures of its `results.json`.

    python bench/eval_throughput.py [--max-frames 500]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi_eval.cli import main as moshi_eval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-frames", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for run in ("first run", "second run (same --out: resumes, nothing to score)", "new --out, cached codes"):
            out = root / ("out2" if run.startswith("new") else "out")
            command = ["demo", "--out", str(out), "--cache-dir", str(root / "cache"), "--threads", "1",
                       "--no-progress", "--max-frames", str(args.max_frames), "--bootstrap", "0"]
            start = time.perf_counter()
            code = moshi_eval(command)
            wall = time.perf_counter() - start
            runtime = json.loads((out / "results.json").read_text())["runtime"]
            print(f"{run}: exit {code}, wall {wall:.1f} s, frames {runtime['frames']}, "
                  f"frames/s {runtime['frames_per_s']}, code cache {runtime['code_cache']}")


if __name__ == "__main__":
    main()
