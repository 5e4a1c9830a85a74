"""`moshi-eval compare`: runs of the same books side by side, with paired differences and their intervals.

Two runs scored on the same books differ by the model and by nothing else only if their scoring matches
(text mode, user stream, frames and chapters scored, codebook weight): runs that differ there are refused,
naming the difference. Runs are paired on the books they share. For each run, at each report position, the
window mean (`frame +- window`) of the curve over the shared books with its bootstrap interval; for each
run against the reference, the per-book difference of the book's own window mean (and of its own slope), its
mean, a paired bootstrap interval and the share of books where the run is lower. A paired interval removes
the spread between books that both runs share: it is much narrower than two independent intervals.

Runs are read as they are on disk, so they must be finished and at rest: a run folder held by a running
`moshi-eval` (its lock) is refused, naming the run; so is a `results.json` that does not match the book
files it lists (a rescoring interrupted after rewriting some books). Books are paired on the audio they
were scored from (the sha256 of their chapters, recorded in each book file), not on their names; runs of
different codecs are refused (their targets differ), and so are runs of different audio folders whose
books carry no content identity.

Writes `compare.json`, `compare.md` (one table: rows = report positions and slope, columns = runs),
`compare.csv` (one row per run, position and statistic) and `compare.png` (mean curves with their bootstrap
bands per bucket, each model's attention context marked; below, the paired difference and its band).
"""
from dataclasses import dataclass, field
import io
from pathlib import Path
import typing as tp

import numpy as np

from ..files import report
from ..files.folder import ReportError, RunFolder, write_bytes, write_json, write_text
from ..files.hashing import file_sha256
from ..stats.bootstrap import (BookResampler, Interval, book_slope_per_1000, book_window_mean, bucket_band,
                               few_books_note, paired_bootstrap)
from ..errors import MoshiEvalError
from ..stats.metrics import Curve, frame_mean, slope_per_1000

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
    books: dict[str, np.ndarray]       # pairing key (see `book_key`) -> audio_ce [T]
    ids: dict[str, str] = field(default_factory=dict)   # pairing key -> the run's sequence id

    @property
    def context(self) -> int | None:
        return self.results.get("model", {}).get("context")

    @property
    def codec(self) -> str | None:
        return self.results.get("codec", {}).get("identity")


def book_key(sequence_id: str, meta: dict) -> str:
    """What a book is paired on: the sha256 of its chapters in order (the audio it was scored from), or, for
    a book file that does not record them, its sequence id (marked `name:`)."""
    chapters = meta.get("chapters")
    if isinstance(chapters, list) and chapters and all(isinstance(c, dict) and c.get("sha256") for c in chapters):
        return "sha256:" + ",".join(c["sha256"] for c in chapters)
    return "name:" + sequence_id


def _book_entries(results: dict) -> list[dict]:
    books = results.get("books")
    if books is None:
        books = results.get("sequences", [])
    return books if isinstance(books, list) else []


def load_run(path: Path, name: str) -> Run:
    """A finished run at rest: its results.json and the `audio_ce` of each book it lists.

    Raises `CompareError` if a `moshi-eval` run holds the folder (naming it), or if a book file is not the
    one results.json was written from (`file_sha256`, or for older runs a book file newer than results.json).
    """
    path = Path(path)
    try:
        with RunFolder(path) as folder:
            if folder.task != "librilight":
                raise CompareError(f"{path}: a {folder.task} run, not a librilight run.")
            return _load_run(path, name, folder.results)
    except ReportError as exc:
        raise CompareError(str(exc)) from None


def _load_run(path: Path, name: str, results: dict) -> Run:
    results_mtime = (path / "results.json").stat().st_mtime_ns
    books: dict[str, np.ndarray] = {}
    ids: dict[str, str] = {}
    for book in _book_entries(results):
        file = path / book["file"]
        _check_book_file(path, file, book, results_mtime)
        try:
            arrays, meta = report.read_sequence(file, with_meta=True)
        except ReportError as exc:
            raise CompareError(f"{path}: {exc}") from exc
        frames = book.get("frames")
        if frames is not None and frames != arrays[LOSS].shape[0]:
            raise CompareError(_stale(path, file, f"it holds {arrays[LOSS].shape[0]} frames, results.json "
                                                  f"lists {frames}"))
        key = book_key(book["sequence_id"], meta)
        if key in books:
            raise CompareError(f"{path}: books {ids[key]} and {book['sequence_id']} were scored from the same "
                               "audio: pairing by content would be ambiguous.")
        books[key], ids[key] = arrays[LOSS], book["sequence_id"]
    if not books:
        raise CompareError(f"{path}: the run lists no finished book.")
    return Run(name, path, results, books, ids)


def _stale(path: Path, file: Path, why: str) -> str:
    return (f"{path}: results.json does not match the book file {file} ({why}): the run was changed after "
            "results.json was written (an interrupted rescoring?). Rerun that run's command in the same --out "
            "to finish it, then compare.")


def _check_book_file(path: Path, file: Path, book: dict, results_mtime: int) -> None:
    """The book file is the one results.json was written from: its sha256 when recorded, else not newer."""
    try:
        st = file.stat()
    except OSError as exc:
        raise CompareError(_stale(path, file, f"cannot read it: {exc.strerror}")) from exc
    expected = book.get("file_sha256")
    if expected is not None:
        digest = file_sha256(file)
        if digest != expected:
            raise CompareError(_stale(path, file, f"sha256 {digest[:12]}..., results.json lists {expected[:12]}..."))
    elif st.st_mtime_ns > results_mtime:
        raise CompareError(_stale(path, file, "written after results.json"))


def check_comparable(runs: list[Run]) -> None:
    """Refuse runs whose numbers differ by more than the model: scoring options, codec, or (for books
    without a content identity) the audio folder."""
    reference = runs[0]
    for run in runs[1:]:
        for key in SCORING_KEYS:
            a, b = reference.results["config"].get(key), run.results["config"].get(key)
            if a != b:
                raise CompareError(f"runs {reference.name} and {run.name} were scored differently: {key} is "
                                   f"{a!r} in {reference.path} and {b!r} in {run.path}. Only the model may differ.")
        if reference.codec is not None and run.codec is not None and reference.codec != run.codec:
            raise CompareError(f"runs {reference.name} and {run.name} were encoded by different codecs (identity "
                               f"{reference.codec[:12]}... in {reference.path}, {run.codec[:12]}... in {run.path}): "
                               "their targets are other codes, their losses cannot be paired.")
        a, b = reference.results["config"].get("audio_dir"), run.results["config"].get("audio_dir")
        by_name = [k for k in set(reference.books) | set(run.books) if k.startswith("name:")]
        if a != b and by_name:
            raise CompareError(f"runs {reference.name} and {run.name} read different audio folders ({a} and {b}) "
                               "and their book files record no chapter sha256 to pair them by content: books "
                               "of the same name may hold other audio.")


def _check_pairs(runs: list[Run], shared: list[str]) -> None:
    """Paired books have the same frames in every run; same-named books with other audio are named."""
    reference = runs[0]
    for key in shared:
        lengths = {r.name: int(r.books[key].shape[0]) for r in runs}
        if len(set(lengths.values())) > 1:
            raise CompareError(f"book {reference.ids[key]} has different frame counts across runs {lengths}, "
                               "although scored from the same audio: the runs do not score the same frames.")


def _same_name_other_audio(runs: list[Run]) -> list[str]:
    """Sequence ids present in several runs but scored from different audio (not paired)."""
    found = []
    reference = runs[0]
    by_id = {sid: key for key, sid in reference.ids.items()}
    for run in runs[1:]:
        for key, sid in run.ids.items():
            if sid in by_id and by_id[sid] != key:
                found.append(sid)
    return sorted(set(found))


def _cell(interval: Interval | dict, value: float | None) -> str:
    data = interval if isinstance(interval, dict) else interval.to_dict()
    if value is None or not np.isfinite(value):
        return "-"
    if not data["present"]:
        return f"{value:.3f}"
    return f"{value:.3f} [{data['low']:.3f}, {data['high']:.3f}]"


def default_report_positions(runs: list[Run]) -> tuple[list[int] | None, int | None]:
    """The report positions and half window the reference run (the first) was reported at, if recorded."""
    config = runs[0].results.get("config", {})
    report_at = config.get("report_at")
    window = config.get("report_window")
    ok = isinstance(report_at, list) and report_at and all(isinstance(f, int) and f >= 0 for f in report_at)
    return (list(report_at) if ok else None), (window if isinstance(window, int) and window > 0 else None)


def compare(runs: list[Run], reference: str, report_at: tp.Sequence[int], half_window: int, bucket: int,
            resamples: int, seed: int) -> dict[str, tp.Any]:
    """The comparison as a JSON-ready dict (see the module docstring)."""
    check_comparable(runs)
    names = [r.name for r in runs]
    if reference not in names:
        raise CompareError(f"--reference {reference!r} is not one of the runs {names}.")
    ref = next(r for r in runs if r.name == reference)
    first = runs[0]
    keys = sorted(set.intersection(*(set(r.books) for r in runs)), key=lambda k: first.ids[k])
    if len(keys) == 0:
        other_audio = _same_name_other_audio(runs)
        hint = (f" Books of the same name hold other audio (e.g. {other_audio[:3]}): the runs read different "
                "audio." if other_audio else "")
        raise CompareError("the runs share no book (books are paired on the sha256 of their chapters): nothing "
                           "to pair." + hint)
    _check_pairs(runs, keys)
    shared = [first.ids[k] for k in keys]
    left_out = {r.name: sorted(r.ids[k] for k in set(r.books) - set(keys)) for r in runs}
    longest = max(int(r.books[k].shape[0]) for r in runs for k in keys)
    if not any(frame < longest for frame in report_at):
        raise CompareError(f"no report position {list(report_at)} is reached: the longest shared book has "
                           f"{longest} frames. Give --report-at positions below {longest}.")
    out: dict[str, tp.Any] = {"reference": reference, "runs": [], "shared_books": shared, "left_out": left_out,
                              "pairing": "sha256 of the chapters" if all(k.startswith("sha256:") for k in keys)
                              else "sequence id (book files without chapter sha256)",
                              "report_at": list(report_at), "half_window": half_window, "bucket": bucket,
                              "resamples": resamples, "seed": seed, "loss": LOSS, "notes": []}
    out["few_books"] = few_books_note(len(keys))     # Also shown under the table and on the plot.
    other_audio = _same_name_other_audio(runs)
    if other_audio:
        out["notes"].append(f"not paired, same name but other audio: {other_audio}")
    for run in runs:
        values = [run.books[k] for k in keys]
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
                position["paired"] = _paired(run, ref, keys, lambda v: book_window_mean(v, frame, half_window),
                                             resamples, seed)
            entry["positions"].append(position)
        slope = _curve_slope(curve)
        entry["slope"] = {"per_1000_frames": slope, "interval": sampler.slope_per_1000().to_dict()}
        if run is not ref:
            entry["slope"]["paired"] = _paired(run, ref, keys, book_slope_per_1000, resamples, seed)
            if run.path.resolve() == ref.path.resolve():
                out["notes"].append(f"{run.name} and {ref.name} are the same run folder ({run.path}): their "
                                    "differences are zero by construction and their intervals have zero width.")
            elif all(np.array_equal(run.books[k], ref.books[k], equal_nan=True) for k in keys):
                out["notes"].append(f"{run.name} and {ref.name} have identical losses on every shared book (the "
                                    "same model and scoring?): their differences are zero and their intervals "
                                    "have zero width; they say nothing about a difference between models.")
        out["runs"].append(entry)
    return out


def _curve_slope(curve: Curve) -> float | None:
    slope = slope_per_1000(curve)
    return slope.per_1000_frames if slope.present else None


def _paired(run: Run, ref: Run, keys: list[str], statistic: tp.Callable[[np.ndarray], float],
            resamples: int, seed: int) -> dict[str, tp.Any]:
    """Per-book differences run - reference of `statistic`, their mean, interval and share lower."""
    diffs = np.array([statistic(run.books[k]) - statistic(ref.books[k]) for k in keys])
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
    notes = result.get("notes", []) + ([result["few_books"]] if result.get("few_books") else [])
    lines += [""] + [f"Note: {note}" for note in notes] if notes else []
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

    bucket = result["bucket"]
    ref = next(r for r in runs if r.name == result["reference"])
    by_id = {sid: key for key, sid in runs[0].ids.items()}
    shared = [by_id[sid] for sid in result["shared_books"]]
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
        few = f"\n{result['few_books']}" if result.get("few_books") else ""
        top.set_title(f"{len(shared)} shared books; bands: 95% bootstrap over books; dashed: attention context{few}",
                      fontsize=8 if few else None)
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
    write_bytes(path, buffer.getvalue())


def _pad(values: np.ndarray, length: int) -> np.ndarray:
    out = np.full(length, np.nan)
    n = min(length, values.shape[0])
    out[:n] = values[:n]
    return out


def write(out: Path, runs: list[Run], result: dict[str, tp.Any], log_x: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    frame_rate = float(runs[0].results.get("codec", {}).get("frame_rate", 12.5))
    paths = [out / "compare.json", out / "compare.md", out / "compare.csv", out / "compare.png"]
    write_json(paths[0], result)
    write_text(paths[1], markdown_table(result))
    write_text(paths[2], csv_rows(result))
    plot(paths[3], runs, result, frame_rate, log_x)
    return paths
