"""`moshi-eval compare`: runs of the same books side by side, with paired differences and their intervals.

Two runs scored on the same books differ by the model and by nothing else only if their scoring matches
(text mode, user stream, frames and chapters scored, codebook weight): runs that differ there are refused,
naming the difference. Runs are paired on the books they share. For each run, at each report position, the
window mean (`frame +- window`) of the curve over the shared books with its bootstrap interval; for each
run against the reference, the per-book difference of the book's own window mean (and of its own slope), its
mean, a paired bootstrap interval and the share of books where the run is lower. A paired interval removes
the spread between books that both runs share: it is much narrower than two independent intervals.

Writes `compare.json`, `compare.md` (one table: rows = report positions and slope, columns = runs),
`compare.csv` (one row per run, position and statistic) and `compare.png` (mean curves with their bootstrap
bands per bucket, each model's attention context marked; below, the paired difference and its band).
"""
from dataclasses import dataclass
import io
import json
from pathlib import Path
import typing as tp

import numpy as np

from . import report
from .bootstrap import (BookResampler, Interval, book_slope_per_1000, book_window_mean, bucket_band,
                        paired_bootstrap)
from .errors import MoshiEvalError
from .metrics import Curve, frame_mean, slope_per_1000

# Scoring options that must match between compared runs (the model is what is compared).
SCORING_KEYS = ("text", "user_stream", "max_frames", "max_chapters", "first_codebook_weight")
LOSS = "audio_ce"


class CompareError(MoshiEvalError, ValueError):
    """Runs that cannot be compared; the message says why."""


@dataclass
class Run:
    name: str
    path: Path
    results: dict
    books: dict[str, np.ndarray]       # sequence id -> audio_ce [T]

    @property
    def context(self) -> int | None:
        return self.results.get("model", {}).get("context")


def load_run(path: Path, name: str) -> Run:
    """A finished run: its results.json and the `audio_ce` of each book it lists."""
    results_path = Path(path) / report.RESULTS_JSON
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: not a finished run ({results_path}: {exc}).") from exc
    books = {}
    for book in results.get("books", []):
        arrays = report.read_sequence(Path(path) / book["file"])
        books[book["sequence_id"]] = arrays[LOSS]
    if not books:
        raise CompareError(f"{path}: the run lists no finished book.")
    return Run(name, Path(path), results, books)


def check_comparable(runs: list[Run]) -> None:
    reference = runs[0]
    for run in runs[1:]:
        for key in SCORING_KEYS:
            a, b = reference.results["config"].get(key), run.results["config"].get(key)
            if a != b:
                raise CompareError(f"runs {reference.name} and {run.name} were scored differently: {key} is "
                                   f"{a!r} in {reference.path} and {b!r} in {run.path}. Only the model may differ.")


def _cell(interval: Interval | dict, value: float | None) -> str:
    data = interval if isinstance(interval, dict) else interval.to_dict()
    if value is None or not np.isfinite(value):
        return "-"
    if not data["present"]:
        return f"{value:.3f}"
    return f"{value:.3f} [{data['low']:.3f}, {data['high']:.3f}]"


def compare(runs: list[Run], reference: str, report_at: tp.Sequence[int], half_window: int, bucket: int,
            resamples: int, seed: int) -> dict[str, tp.Any]:
    """The comparison as a JSON-ready dict (see the module docstring)."""
    check_comparable(runs)
    names = [r.name for r in runs]
    if reference not in names:
        raise CompareError(f"--reference {reference!r} is not one of the runs {names}.")
    ref = next(r for r in runs if r.name == reference)
    shared = sorted(set.intersection(*(set(r.books) for r in runs)))
    if len(shared) == 0:
        raise CompareError("the runs share no book: nothing to pair.")
    left_out = {r.name: sorted(set(r.books) - set(shared)) for r in runs}
    out: dict[str, tp.Any] = {"reference": reference, "runs": [], "shared_books": shared, "left_out": left_out,
                              "report_at": list(report_at), "half_window": half_window, "bucket": bucket,
                              "resamples": resamples, "seed": seed, "loss": LOSS}
    for run in runs:
        values = [run.books[b] for b in shared]
        sampler = BookResampler(values, resamples, seed)
        curve = frame_mean(values)
        entry: dict[str, tp.Any] = {"name": run.name, "path": str(run.path), "context": run.context,
                                    "positions": [], "slope": None}
        for frame in report_at:
            lo, hi = max(0, frame - half_window), min(curve.num_frames, frame + half_window + 1)
            reached = frame < curve.num_frames and curve.count[frame] > 0
            mean = float(np.nanmean(curve.mean[lo:hi])) if reached else None
            interval = sampler.window_mean(lo, hi) if reached else Interval(False, 0, absent_reason="not reached")
            position = {"frame": frame, "window_mean": mean, "interval": interval.to_dict()}
            if run is not ref:
                position["paired"] = _paired(run, ref, shared, lambda v: book_window_mean(v, frame, half_window),
                                             resamples, seed)
            entry["positions"].append(position)
        slope = _curve_slope(curve)
        entry["slope"] = {"per_1000_frames": slope, "interval": sampler.slope_per_1000().to_dict()}
        if run is not ref:
            entry["slope"]["paired"] = _paired(run, ref, shared, book_slope_per_1000, resamples, seed)
        out["runs"].append(entry)
    return out


def _curve_slope(curve: Curve) -> float | None:
    slope = slope_per_1000(curve)
    return slope.per_1000_frames if slope.present else None


def _paired(run: Run, ref: Run, shared: list[str], statistic: tp.Callable[[np.ndarray], float],
            resamples: int, seed: int) -> dict[str, tp.Any]:
    """Per-book differences run - reference of `statistic`, their mean, interval and share lower."""
    diffs = np.array([statistic(run.books[b]) - statistic(ref.books[b]) for b in shared])
    ok = np.isfinite(diffs)
    interval = paired_bootstrap(diffs, resamples, seed)
    return {"mean_difference": float(diffs[ok].mean()) if ok.any() else None, "books": int(ok.sum()),
            "share_lower": float((diffs[ok] < 0).mean()) if ok.any() else None, "interval": interval.to_dict()}


def markdown_table(result: dict[str, tp.Any]) -> str:
    """Rows: report positions and slope; columns: runs (mean [95% CI]), then each run - reference."""
    runs = result["runs"]
    others = [r for r in runs if r["name"] != result["reference"]]
    header = ["", *[f"{r['name']}" for r in runs], *[f"{r['name']} - {result['reference']}" for r in others]]
    lines = [f"{LOSS} (nats), mean over {len(result['shared_books'])} shared books with 95% bootstrap interval "
             f"({result['resamples']} resamples); differences paired by book.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, frame in enumerate(result["report_at"]):
        cells = [f"frame {frame} (+-{result['half_window']})"]
        cells += [_cell(r["positions"][i]["interval"], r["positions"][i]["window_mean"]) for r in runs]
        cells += [_cell(r["positions"][i]["paired"]["interval"], r["positions"][i]["paired"]["mean_difference"])
                  for r in others]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["slope per 1000 frames"] + [_cell(r["slope"]["interval"], r["slope"]["per_1000_frames"]) for r in runs]
    cells += [_cell(r["slope"]["paired"]["interval"], r["slope"]["paired"]["mean_difference"]) for r in others]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(result: dict[str, tp.Any]) -> str:
    lines = ["run,statistic,frame,value,low,high,paired_difference,paired_low,paired_high,share_lower"]

    def row(run: str, statistic: str, frame: tp.Any, value: tp.Any, interval: dict, paired: dict | None) -> str:
        p = paired or {"mean_difference": None, "interval": {"low": None, "high": None}, "share_lower": None}
        fields = [run, statistic, frame, value, interval.get("low"), interval.get("high"), p["mean_difference"],
                  p["interval"].get("low"), p["interval"].get("high"), p["share_lower"]]
        return ",".join("" if f is None else str(f) for f in fields)

    for r in result["runs"]:
        for position in r["positions"]:
            lines.append(row(r["name"], "window_mean", position["frame"], position["window_mean"],
                             position["interval"], position.get("paired")))
        lines.append(row(r["name"], "slope_per_1000", "", r["slope"]["per_1000_frames"], r["slope"]["interval"],
                         r["slope"].get("paired")))
    return "\n".join(lines) + "\n"


def plot(path: Path, runs: list[Run], result: dict[str, tp.Any], frame_rate: float, log_x: bool = False) -> None:
    """Mean curves per bucket with bootstrap bands (top) and paired differences to the reference (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared, bucket = result["shared_books"], result["bucket"]
    ref = next(r for r in runs if r.name == result["reference"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), dpi=110, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    try:
        for run in runs:
            values = [run.books[b] for b in shared]
            x, mean, low, high = bucket_band(values, bucket, result["resamples"], result["seed"])
            minutes = x / frame_rate / 60
            line = top.plot(minutes, mean, lw=1.8, label=run.name)[0]
            top.fill_between(minutes, low, high, color=line.get_color(), alpha=0.2)
            if run.context is not None:
                top.axvline(run.context / frame_rate / 60, color=line.get_color(), ls="--", lw=1)
            if run is not ref:
                diffs = [run.books[b] - _pad(ref.books[b], len(run.books[b])) for b in shared]
                x, mean, low, high = bucket_band(diffs, bucket, result["resamples"], result["seed"])
                bottom.plot(x / frame_rate / 60, mean, color=line.get_color(), lw=1.5)
                bottom.fill_between(x / frame_rate / 60, low, high, color=line.get_color(), alpha=0.2)
        bottom.axhline(0.0, color="black", lw=0.8)
        top.set_ylabel(f"{LOSS} (nats), bucket means")
        top.set_title(f"{len(shared)} shared books; bands: 95% bootstrap over books; dashed: attention context")
        top.legend(fontsize=8)
        bottom.set_ylabel(f"run - {ref.name} (paired)")
        bottom.set_xlabel("context (minutes of audio before the frame)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            if log_x:
                ax.set_xscale("log")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    report.write_bytes_atomic(path, buffer.getvalue())


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    out = np.full(length, np.nan)
    n = min(length, values.shape[0])
    out[:n] = values[:n]
    return out


def write(out: Path, runs: list[Run], result: dict[str, tp.Any], log_x: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    frame_rate = float(runs[0].results.get("codec", {}).get("frame_rate", 12.5))
    paths = [out / "compare.json", out / "compare.md", out / "compare.csv", out / "compare.png"]
    report.write_json_atomic(paths[0], result)
    report.write_text_atomic(paths[1], markdown_table(result))
    report.write_text_atomic(paths[2], csv_rows(result))
    plot(paths[3], runs, result, frame_rate, log_x)
    return paths
