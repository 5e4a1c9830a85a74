"""Which moshi releases moshi-patch works with, checked when it is imported.

`tests/helpers/moshi_matrix.py` runs the oracle tests against each release: `moshi_patch` (`step_with_logits`, chunks,
TTT) passes them on moshi 0.2.9 to 0.2.13 (0.2.8 lacks `LMGen._step`); `moshi_eval` needs 0.2.12 or newer
(Mimi configs in `loaders.get_mimi`). Another version fails at import with a message naming it; set
`MOSHI_PATCH_SKIP_VERSION_CHECK=1` to import anyway (a fork of moshi with its own version number, say), and
run `moshi-eval check-streaming` on your model before trusting numbers.
"""
from importlib import metadata
import os
import re

SUPPORTED_MOSHI = ((0, 2, 9), (0, 2, 13))
SUPPORTED_MOSHI_EVAL = ((0, 2, 12), (0, 2, 13))
SKIP_ENV = "MOSHI_PATCH_SKIP_VERSION_CHECK"


def _release(version: str) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return None if match is None else tuple(int(part) for part in match.groups())


def _format(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release))


def check_moshi_version(package: str, supported: tuple[tuple[int, ...], tuple[int, ...]],
                        version: str | None = None) -> None:
    """Raise ImportError unless the installed moshi (or `version`) is in the inclusive range `supported`."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    if version is None:
        try:
            version = metadata.version("moshi")
        except metadata.PackageNotFoundError:
            import moshi
            version = getattr(moshi, "__version__", "unknown")
    low, high = supported
    release = _release(version)
    if release is None or not low <= release <= high:
        raise ImportError(
            f"{package} supports moshi {_format(low)} to {_format(high)}, but moshi {version} is installed. "
            f"Install a supported release (pip install 'moshi>={_format(low)},<={_format(high)}'), or set "
            f"{SKIP_ENV}=1 to import it anyway and check your model with `moshi-eval check-streaming`.")
