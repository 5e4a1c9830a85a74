"""The files of a LibriLight run beside `config.json` and `results.json` (which `folder.OutputFolder` owns):

- `sequences/<sequence_id>.npz`: one per finished sequence, written atomically (temporary file +
  `os.replace`) as soon as the sequence is done: `audio_ce [T]`, `audio_ce_weighted [T]`,
  `codebook_ce [K, T]` float32, `text_token [T]` int64, and `meta_json` (the full id, the identity of the
  chapters it was scored from, the batch it was scored in). Long ids get a shortened file name.
- `curve.csv`: the per-frame mean over the books reaching each frame.
- `curve.png`: loss against minutes of context, one line per book and the mean, with the model's
  attention context marked.
"""
import csv
import hashlib
import io
import json
from pathlib import Path
import typing as tp

import numpy as np

from ..stats.metrics import frame_mean
from .atomic import json_safe
from .folder import ReportError, write_bytes, write_text
CURVE_CSV = "curve.csv"
CURVE_PNG = "curve.png"
SEQUENCES_DIR = "sequences"
SEQUENCE_ARRAYS = ("audio_ce", "audio_ce_weighted", "codebook_ce", "text_token")


# Longer ids get a shortened file name: a file name has at most 255 bytes, and the temporary file of an
# atomic write adds about 20 to it.
MAX_FILE_STEM = 120


def sequence_path(out_dir: str | Path, sequence_id: str) -> Path:
    """`<out>/sequences/<id>.npz`; for an id longer than `MAX_FILE_STEM`, its first 80 characters and a
    hash of the whole id (collision free in practice; the full id is kept inside the file)."""
    stem = sequence_id
    if len(stem) > MAX_FILE_STEM:
        stem = f"{stem[:80]}-{hashlib.sha256(stem.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    return Path(out_dir) / SEQUENCES_DIR / f"{stem}.npz"


def write_sequence(out_dir: str | Path, sequence_id: str, arrays: dict[str, np.ndarray],
                   meta: dict | None = None) -> Path:
    """Atomically write `<out>/sequences/<sequence_id>.npz` with the arrays of `SEQUENCE_ARRAYS` and
    `meta` (a JSON object: the full id, the chapters' identity...) as the string array `meta_json`, with
    `arrays_sha256` added: the checksum `read_sequence` checks, so that edited values are refused."""
    _check_sequence_arrays(sequence_id, arrays)
    path = sequence_path(out_dir, sequence_id)
    buffer = io.BytesIO()
    meta = dict(meta or {}, arrays_sha256=_arrays_sha256(arrays))
    extra = {"meta_json": np.asarray(json.dumps(json_safe(meta)))}
    np.savez(buffer, **{k: np.asarray(arrays[k]) for k in SEQUENCE_ARRAYS}, **extra)
    write_bytes(path, buffer.getvalue())
    return path


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in SEQUENCE_ARRAYS:
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check_sequence_arrays(sequence_id: str, arrays: dict[str, np.ndarray]) -> None:
    missing = [k for k in SEQUENCE_ARRAYS if k not in arrays]
    if missing:
        raise ReportError(f"{sequence_id}: missing arrays {missing} (expected {list(SEQUENCE_ARRAYS)}).")
    T = np.asarray(arrays["audio_ce"]).shape
    if len(T) != 1 or T[0] == 0:
        raise ReportError(f"{sequence_id}: audio_ce must be a non-empty [T] array, got shape {T}.")
    for k in ("audio_ce_weighted", "text_token"):
        if np.asarray(arrays[k]).shape != T:
            raise ReportError(f"{sequence_id}: {k} must have shape {T}, got {np.asarray(arrays[k]).shape}.")
    cb = np.asarray(arrays["codebook_ce"]).shape
    if len(cb) != 2 or cb[1] != T[0]:
        raise ReportError(f"{sequence_id}: codebook_ce must have shape [K, {T[0]}], got {cb}.")


@tp.overload
def read_sequence(path: str | Path) -> dict[str, np.ndarray]: ...
@tp.overload  # noqa: E302
def read_sequence(path: str | Path, with_meta: tp.Literal[True]) -> tuple[dict[str, np.ndarray], dict]: ...


def read_sequence(path, with_meta=False):  # noqa: E302
    """The arrays of a sequence file (and its meta, `{}` if it has none, with `with_meta`); ReportError
    naming the file if it is unreadable, inconsistent, or holds no finite loss (corrupt)."""
    path = Path(path)
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files if k in SEQUENCE_ARRAYS}
            meta = json.loads(str(data["meta_json"])) if "meta_json" in data.files else {}
    except Exception as exc:   # zipfile / pickle / JSON / OS errors: the file is not a sequence file
        raise ReportError(f"cannot read sequence file {path}: {exc}") from exc
    _check_sequence_arrays(str(path), arrays)
    recorded = meta.get("arrays_sha256") if isinstance(meta, dict) else None
    if recorded is not None and recorded != _arrays_sha256(arrays):
        raise ReportError(f"sequence file {path}: its values do not match the checksum written with them (edited "
                          "or corrupt). Delete it and rerun the same command to score the book again.")
    if not np.isfinite(arrays["audio_ce"]).any():
        raise ReportError(f"sequence file {path} holds no finite loss: it is corrupt. Delete it and rerun the "
                          "same command to score the book again.")
    return (arrays, meta) if with_meta else arrays


def write_curve_csv(path: str | Path, sequences: dict[str, dict[str, np.ndarray]], frame_rate: float) -> None:
    """`curve.csv`: per frame, the number of sequences reaching it and the mean of each loss over them.

    Columns: frame, minutes (frame / frame_rate / 60), num_sequences, audio_ce, audio_ce_weighted,
    codebook_0_ce ... codebook_{K-1}_ce.
    """
    if not sequences:
        raise ReportError("no finished sequence to write a curve of.")
    items = list(sequences.values())
    plain = frame_mean([s["audio_ce"] for s in items])
    weighted = frame_mean([s["audio_ce_weighted"] for s in items])
    K = items[0]["codebook_ce"].shape[0]
    books = [frame_mean([s["codebook_ce"][k] for s in items]) for k in range(K)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["frame", "minutes", "num_sequences", "audio_ce", "audio_ce_weighted"]
                    + [f"codebook_{k}_ce" for k in range(K)])
    for t in range(plain.num_frames):
        if plain.count[t] == 0:
            continue
        writer.writerow([t, f"{t / frame_rate / 60:.5f}", int(plain.count[t]), f"{plain.mean[t]:.6f}",
                         f"{weighted.mean[t]:.6f}"] + [f"{b.mean[t]:.6f}" for b in books])
    write_text(path, out.getvalue())


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (causal: the value at t averages frames (t - window, t]); NaN-free input."""
    if window <= 1:
        return y
    c = np.cumsum(np.concatenate([[0.0], y]))
    end = np.arange(1, len(y) + 1)
    start = np.maximum(end - window, 0)
    out = (c[end] - c[start]) / (end - start)
    return out


def smoothing_window(num_frames: int) -> int:
    """Frames averaged in the plot: 1/50 of the longest book, at least 1 and at most 125 (10 s)."""
    return int(min(125, max(1, num_frames // 50)))


def plot_curve(path: str | Path, sequences: dict[str, np.ndarray], frame_rate: float,
               context: int | None, title: str = "", ylabel: str = "audio cross-entropy (nats)",
               band: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
               log_x: bool = False, bucket: int | None = None) -> None:
    """`curve.png` (`curve_figure`), written atomically."""
    import matplotlib.pyplot as plt

    fig = curve_figure(sequences, frame_rate, context, title, ylabel, band, log_x, bucket)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    write_bytes(Path(path), buffer.getvalue())


def curve_figure(sequences: dict[str, np.ndarray], frame_rate: float, context: int | None, title: str = "",
                 ylabel: str = "audio cross-entropy (nats)",
                 band: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
                 log_x: bool = False, bucket: int | None = None) -> tp.Any:
    """The curve figure: loss `[T_i]` of each book and their mean, against minutes of context (matplotlib Agg;
    the caller closes it).

    Each line says what it averages. Thin lines: each book, trailing moving average over `smoothing_window`
    frames. Black: the mean over the books reaching each frame; with `band` (bucket centres in frames, bucket
    means and their 95% bootstrap interval over books, `bootstrap.bucket_band`, over `bucket` frames) the black
    line is those bucket means, the very quantity the band is around; without, the per-frame mean under the
    same moving average as the books. Grey steps (right axis): how many books reach each frame, so the frame
    where the mean stops being over all books shows. With fewer than `bootstrap.MIN_BOOKS_FOR_INTERVAL`
    books the band is labelled as not meaningful. A vertical line marks the model's attention context
    (`context` frames): to its right, the KV cache no longer holds the start of the book, so only recurrent
    state can carry it. `log_x`: a logarithmic time axis, for curves over hours.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..stats.bootstrap import MIN_BOOKS_FOR_INTERVAL, few_books_note

    if not sequences:
        raise ReportError("no finished sequence to plot.")
    T = max(len(v) for v in sequences.values())
    window = smoothing_window(T)
    smooth = f"moving average over {window} frames" if window > 1 else "per frame"
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for name, values in sequences.items():
        v = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(v)
        x = np.arange(len(v))[ok] / frame_rate / 60
        ax.plot(x, _moving_average(v[ok], window), lw=0.8, alpha=0.5, label=name if len(sequences) <= 8 else None)
    curve = frame_mean([np.asarray(v) for v in sequences.values()])
    reached = curve.count > 0
    note = few_books_note(len(sequences))
    if band is not None and len(band[0]):
        centres, means, low, high = band
        if bucket is None:
            bucket = int(round(2 * centres[0])) if len(centres) == 1 else int(round(centres[1] - centres[0]))
        ax.plot(centres / frame_rate / 60, means, color="black", lw=2.0, marker=".",
                label=f"mean over the books reaching each frame, {bucket}-frame bucket means")
        if np.isfinite(low).any():
            label = "95% bootstrap band over books of those bucket means"
            if note is not None:
                label += f"\n(only {len(sequences)} books: NOT meaningful)"
            ax.fill_between(centres / frame_rate / 60, low, high, color="black", alpha=0.2, label=label)
    else:
        x = np.arange(T)[reached] / frame_rate / 60
        ax.plot(x, _moving_average(curve.mean[reached], window), color="black", lw=2.0,
                label=f"mean over the books reaching each frame, {smooth}")
    counts = ax.twinx()
    counts.step(np.arange(T)[reached] / frame_rate / 60, curve.count[reached], where="post", color="grey",
                lw=1.0, alpha=0.7, label="books reaching the frame")
    counts.set_ylabel("books reaching the frame (grey steps)", color="grey")
    counts.set_ylim(0, max(1, int(curve.count.max())) * 1.15)
    counts.yaxis.get_major_locator().set_params(integer=True)
    if log_x:
        ax.set_xscale("log")
    if context is not None:
        minutes = context / frame_rate / 60
        ax.axvline(minutes, color="red", ls="--", lw=1.2)
        ax.text(minutes, 0.98, f" attention context\n ({context} frames = {minutes:.2f} min)",
                color="red", transform=ax.get_xaxis_transform(), va="top", ha="left", fontsize=8)
    ax.set_xlabel("context (minutes of audio before the frame)")
    ax.set_ylabel(f"{ylabel}\n(each book: {smooth})")
    few = (f"\nonly {len(sequences)} book(s): an interval over fewer than {MIN_BOOKS_FOR_INTERVAL} books is not "
           "meaningful (see results.json)")
    ax.set_title((title or "per-frame loss against context") + (few if note is not None and band is not None
                                                                else ""), fontsize=9)
    ax.grid(alpha=0.3)
    # Below the axes: inside, it hid the books' lines or the attention context's label.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return fig
