"""Runs the oracle tests against each moshi release of a range, on demand (not part of the test suite).

    python tests/helpers/moshi_matrix.py [--versions 0.2.8,0.2.9,...] [--dest ~/.cache/moshi-patch/moshi-versions]

Each release's package is installed alone (`pip install --no-deps --target`) and put first on PYTHONPATH,
so the tests run that moshi's code with the torch, sphn and numpy of the current environment (older moshi
releases declare older torch pins: this checks moshi_patch against their code, not their whole stack).
`MOSHI_PATCH_SKIP_VERSION_CHECK=1` lets moshi_patch import outside its supported range for the run. Prints
one line per release: the pytest summary, and the first error when it fails. moshi_eval's oracles run only
for the releases it supports (`moshi_patch.compat.SUPPORTED_MOSHI_EVAL`).
"""
import argparse
import os
from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from moshi_patch.compat import SUPPORTED_MOSHI_EVAL, _release  # noqa: E402
# moshi_patch's oracles (they import nothing of moshi_eval), then moshi_eval's, for releases it supports.
CORE_ORACLES = ["tests/test_step_with_logits.py", "tests/test_chunked.py", "tests/test_ttt.py"]
EVAL_ORACLES = ["tests/test_ttt_lm.py", "tests/test_scoring.py"]
DEFAULT_VERSIONS = "0.2.8,0.2.9,0.2.10,0.2.11,0.2.12,0.2.13"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", default=DEFAULT_VERSIONS)
    parser.add_argument("--dest", type=Path, default=Path.home() / ".cache" / "moshi-patch" / "moshi-versions")
    args = parser.parse_args()
    failed = 0
    for version in args.versions.split(","):
        target = args.dest / version
        if not (target / "moshi").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                            str(target), f"moshi=={version}"], check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]),
                   MOSHI_PATCH_SKIP_VERSION_CHECK="1", NO_TORCH_COMPILE="1")
        for name, oracles in (("moshi_patch", CORE_ORACLES), ("moshi_eval", EVAL_ORACLES)):
            release = _release(version)
            if name == "moshi_eval" and (release is None or not
                                         SUPPORTED_MOSHI_EVAL[0] <= release <= SUPPORTED_MOSHI_EVAL[1]):
                print(f"moshi {version}, {name}: not supported (moshi_patch.compat.SUPPORTED_MOSHI_EVAL), skipped",
                      flush=True)
                continue
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *oracles],
                                    cwd=ROOT, env=env, capture_output=True, text=True)
            lines = result.stdout.strip().splitlines()
            summary = lines[-1] if lines else result.stderr.strip().splitlines()[-1]
            first_error = next((line for line in lines if line.startswith("E ")), "")
            print(f"moshi {version}, {name}: {summary}" + (f"\n    {first_error}" if result.returncode else ""),
                  flush=True)
            failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
