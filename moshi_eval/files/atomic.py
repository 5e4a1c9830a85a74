"""All-or-nothing file writes, shared by the code cache and the report: an interrupted run never leaves a
half-written file where a finished one is expected."""
import os
from pathlib import Path
import tempfile
import typing as tp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write: tp.Callable[[tp.BinaryIO], None]) -> None:
    """Write `path` through a temporary file in the same folder and `os.replace`: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _FILE_MODE)      # mkstemp creates 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: tp.Any) -> tp.Any:
    """`value` with what JSON cannot hold made plain: NaN / inf become None (an absent value is explained where
    it matters), numpy scalars Python numbers, paths strings, tuples lists."""
    import math
    import numpy as np
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def json_form(value: tp.Any) -> tp.Any:
    """`value` as it reads back from a JSON file (tuples become lists, NaN None...)."""
    import json
    return json.loads(json.dumps(json_safe(value)))
