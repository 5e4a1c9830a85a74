"""Metrics and the loss curve to Weights & Biases or TensorBoard, from the API or the command line.

From a training loop (`result` an `EvalResult` of `LibriLightEvaluator`, a `LikelihoodResult` of
`LikelihoodEvaluator`, or an `EvalResults` of `Evaluators`, all of them in one dict):

    moshi_eval.loggers.log_wandb(result, step=step)              # into the active wandb run (wandb.init first)
    moshi_eval.loggers.log_tensorboard(writer, result, step=step)  # a torch.utils.tensorboard.SummaryWriter

or, without these helpers, `wandb.log(result.metrics, step=step)` /
`for k, v in result.metrics.items(): writer.add_scalar(k, v, step)`.

Logged: every metric of `result.metrics` under its name (`librilight/audio_ce@8000`, ...), and the curve:
to W&B a table `librilight/curve` (bucket centre in frames and minutes, bucket mean of audio_ce, books reaching
it) and the curve plot `librilight/curve_plot`; to TensorBoard the curve plot as the image `librilight/curve`.
Likelihood results log their metrics only (`sblimp/accuracy`, ...). The command line logs the same with
`--wandb PROJECT[/RUN]` and `--tensorboard DIR` (`moshi-eval librilight` and `moshi-eval likelihood`).

wandb and tensorboard are optional: `pip install 'moshi-patch[wandb]'` / `pip install 'moshi-patch[tensorboard]'`.
"""
import importlib
import io
from pathlib import Path
import re
import typing as tp

import numpy as np

from .errors import MoshiEvalError
from .files import report
from .files.folder import RunFolder

INSTALL = {"wandb": "pip install 'moshi-patch[wandb]'  (or: pip install wandb)",
           "tensorboard": "pip install 'moshi-patch[tensorboard]'  (or: pip install tensorboard)"}


class LoggerError(MoshiEvalError, ValueError):
    """A logger that cannot be used: its package is missing, or a bad `--wandb` value."""


def require(package: str, flag: str) -> tp.Any:
    """Import `package` ("wandb" or "tensorboard"), or raise LoggerError naming `flag` and the pip command."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise LoggerError(f"{flag} needs the {package} package, which is not installed in this environment "
                          f"({exc}): {INSTALL[package]}") from exc


def curve_rows(summary: dict, frame_rate: float) -> list[list[float]]:
    """The audio_ce curve as rows [bucket centre (frames), minutes, bucket mean, fewest books reaching it],
    from the nested metrics (`EvalResult.summary`, results.json's "metrics")."""
    rows = []
    for bucket in summary["audio_ce"]["buckets"]:
        centre = bucket["start"] + bucket["frames"] / 2
        rows.append([centre, centre / frame_rate / 60, bucket["mean"], bucket["min_count"]])
    return rows


def _png(result: tp.Any) -> bytes:
    """The curve plot of an EvalResult, as `curve.png` of the CLI (per-book lines, mean, context mark)."""
    import tempfile
    ev = result._evaluator
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / report.CURVE_PNG
        report.plot_curve(path, {sid: s["audio_ce"] for sid, s in result.sequences.items()},
                          float(ev.mimi.frame_rate), result._model.context,
                          title=f"audio CE of {len(result.sequences)} book(s)", log_x=ev.config.log_x)
        return path.read_bytes()


def _image(png: bytes) -> np.ndarray:
    """`[H, W, 3]` uint8 of a PNG (matplotlib's reader)."""
    import matplotlib.image
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    return (np.asarray(image)[..., :3] * 255).round().astype(np.uint8)


def _parts(result: tp.Any) -> list[tuple[str, tp.Any]]:
    """The results inside `result` as (metric prefix, result): an `EvalResults` holds several."""
    inner = getattr(result, "results", None)
    if isinstance(inner, dict):
        return list(inner.items())
    task = getattr(getattr(result, "config", None), "task", None)   # a LikelihoodResult
    return [(task or "librilight", result)]


def _curves(result: tp.Any, curve: bool) -> list[tuple[str, list[list[float]], bytes]]:
    """(prefix, curve rows, curve plot) of each LibriLight result inside `result` (likelihood results have none)."""
    if not curve:
        return []
    return [(prefix, curve_rows(r.summary, float(r._evaluator.mimi.frame_rate)), _png(r))
            for prefix, r in _parts(result) if hasattr(r, "_evaluator")]


def wandb_payload(wandb: tp.Any, metrics: dict[str, float], rows: list[list[float]], png: bytes | None,
                  prefix: str = "librilight") -> dict:
    payload: dict[str, tp.Any] = dict(metrics)
    if rows:
        payload[f"{prefix}/curve"] = wandb.Table(columns=["frame", "minutes", "audio_ce", "books"], data=rows)
    if png is not None:
        payload[f"{prefix}/curve_plot"] = wandb.Image(_image(png))
    return payload


def log_wandb(result: tp.Any, step: int | None = None, run: tp.Any = None, curve: bool = True) -> None:
    """Log a result's metrics to `run`, by default the active run of `wandb.init`. `result`: an `EvalResult`
    (with `curve`, also its curve table and plot), a `LikelihoodResult` (metrics) or an `EvalResults` of
    `Evaluators` (all its metrics, and each LibriLight curve). Raises LoggerError if wandb is not installed."""
    wandb = require("wandb", "log_wandb")
    payload = dict(result.metrics)
    for prefix, rows, png in _curves(result, curve):
        payload.update(wandb_payload(wandb, {}, rows, png, prefix))
    (run if run is not None else wandb).log(payload, step=step)


def log_tensorboard(writer: tp.Any, result: tp.Any, step: int = 0, curve: bool = True) -> None:
    """`writer.add_scalar(name, value, step)` for each metric of `result` (an `EvalResult`, a `LikelihoodResult`
    or an `EvalResults`), and (with `curve`) each LibriLight curve plot as the image `<prefix>/curve`.
    `writer`: a `torch.utils.tensorboard.SummaryWriter`."""
    curves = _curves(result, curve)
    tensorboard_scalars(writer, result.metrics, None, step)
    for prefix, _, png in curves:
        tensorboard_scalars(writer, {}, png, step, prefix)


def tensorboard_scalars(writer: tp.Any, metrics: dict[str, float], png: bytes | None, step: int,
                        prefix: str = "librilight") -> None:
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)
    if png is not None:
        writer.add_image(f"{prefix}/curve", _image(png), step, dataformats="HWC")
    writer.flush()


def parse_wandb_target(value: str) -> tuple[str, str | None]:
    """`PROJECT` or `PROJECT/RUN` -> (project, run name or None)."""
    project, _, name = value.partition("/")
    if not project or "/" in name or (value.endswith("/") and not name):
        raise LoggerError(f"--wandb: expected PROJECT or PROJECT/RUN, got {value!r}.")
    return project, name or None


def checkpoint_step(checkpoint_dir: str | Path | None) -> int:
    """The training step of a moshi-finetune `checkpoint_NNNNNN` folder (or its consolidated/), else 0."""
    if checkpoint_dir is None:
        return 0
    path = Path(checkpoint_dir)
    for part in (path.name, path.parent.name):
        match = re.fullmatch(r"checkpoint_(\d+)", part)
        if match:
            return int(match.group(1))
    return 0


def log_run(out_dir: str | Path, wandb_target: str | None = None, tensorboard_dir: str | Path | None = None,
            step: int = 0) -> None:
    """Log a finished run folder (`moshi-eval librilight --out`: the metrics of its results.json, flat as
    `EvalResult.metrics`, and its curve, table and plot from curve.png; `moshi-eval likelihood --out`: its flat
    metrics, as `LikelihoodResult.metrics`). Used by `--wandb` and `--tensorboard`."""
    with RunFolder(out_dir) as run:     # at rest, its files as results.json recorded them
        results = run.results
        metrics = dict(results["metrics"])      # flat, under the task's prefix, whatever the task
        curve = run.task == "librilight"
        png = (run.path / report.CURVE_PNG).read_bytes() if curve else None
    rows = curve_rows(results["summary"], results["codec"]["frame_rate"]) if curve else []
    if wandb_target is not None:
        wandb = require("wandb", "--wandb")
        project, name = parse_wandb_target(wandb_target)
        run = wandb.init(project=project, name=name, config=results["config"])
        try:
            run.log(wandb_payload(wandb, metrics, rows, png), step=step)
            run.summary.update(metrics)
        finally:
            run.finish()
    if tensorboard_dir is not None:
        writer = summary_writer(tensorboard_dir)
        try:
            tensorboard_scalars(writer, metrics, png, step)
        finally:
            writer.close()


def _wandb_credentials() -> bool:
    """Whether an online wandb run could authenticate: `WANDB_API_KEY`, or the netrc entry `wandb login` writes for
    the server (`WANDB_BASE_URL`). Read without wandb's own client, which may prompt or reach the network."""
    import netrc
    import os
    from urllib.parse import urlparse
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_targets(wandb_target: str | None, tensorboard_dir: str | Path | None) -> None:
    """What a run checks before it scores anything, so that a logger never fails after the whole run: with
    `--wandb`, wandb installed, the target well formed and a run startable in the chosen mode (online needs an API
    key: `wandb login`, `WANDB_API_KEY`, or `WANDB_MODE=offline`); with `--tensorboard`, tensorboard installed and
    the folder creatable and writable. Raises LoggerError naming the flag."""
    import os
    if wandb_target is not None:
        require("wandb", "--wandb")
        parse_wandb_target(wandb_target)
        mode = (os.environ.get("WANDB_MODE") or "online").lower()
        if mode not in ("offline", "disabled", "dryrun") and not _wandb_credentials():
            raise LoggerError(f"--wandb {wandb_target}: wandb has no API key for an online run (WANDB_MODE={mode}): "
                              "run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline to log to a local "
                              "folder (`wandb sync` it later).")
    if tensorboard_dir is not None:
        require("tensorboard", "--tensorboard")
        folder = Path(tensorboard_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".moshi-eval-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise LoggerError(f"--tensorboard {folder}: cannot write there ({exc.strerror or exc}): give a folder "
                              "this process can create and write.") from exc


def summary_writer(log_dir: str | Path) -> tp.Any:
    """A `torch.utils.tensorboard.SummaryWriter` on `log_dir`; LoggerError if tensorboard is missing."""
    require("tensorboard", "--tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(log_dir))


__all__ = ["LoggerError", "check_targets", "checkpoint_step", "curve_rows", "log_run", "log_tensorboard", "log_wandb",
           "parse_wandb_target", "summary_writer"]
