"""Files of an eval run, written so that no finished work is ever lost.

Layout of `<out>`:
- `config.json`: what determines the per-sequence numbers (model, codec, data, scoring options). A rerun
  with the same `<out>` must have the same config, else it stops (`ConfigMismatchError`).
- `sequences/<sequence_id>.npz`: one per finished sequence, written atomically (temporary file +
  `os.replace`) as soon as the sequence is done: `audio_ce [T]`, `audio_ce_weighted [T]`,
  `codebook_ce [K, T]` float32, `text_token [T]` int64, and `meta_json` (the full id, the identity of the
  chapters it was scored from, the batch it was scored in). Long ids get a shortened file name.
- `results.json`: configuration, versions, model identity, per-book metadata, metrics, runtime, skipped
  books; rebuilt from the `.npz` files at the end of every run.
- `curve.csv`: the per-frame mean over the books reaching each frame.
- `curve.png`: loss against minutes of context, one line per book and the mean, with the model's
  attention context marked.
"""
import csv
import datetime
import hashlib
import io
import json
import math
from pathlib import Path
import typing as tp

import numpy as np

from .atomic import atomic_write as _atomic_write
from .errors import MoshiEvalError
from .metrics import frame_mean

CONFIG_JSON = "config.json"
RESULTS_JSON = "results.json"
CURVE_CSV = "curve.csv"
CURVE_PNG = "curve.png"
SEQUENCES_DIR = "sequences"
SEQUENCE_ARRAYS = ("audio_ce", "audio_ce_weighted", "codebook_ce", "text_token")


class ReportError(MoshiEvalError, ValueError):
    """An output directory that cannot be used (foreign configuration, corrupt result file)."""


class ConfigMismatchError(ReportError):
    """The output directory holds results of another configuration."""


def _write_atomic(path: Path, write: tp.Callable[[tp.BinaryIO], None]) -> None:
    """`atomic.atomic_write`, with a failure (read-only or full disk) reported as a ReportError naming the
    file: what was written before stays whole."""
    try:
        _atomic_write(path, write)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}. The files written before are intact; "
                          "free space or fix the permissions and rerun the same command to resume.") from exc


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    _write_atomic(Path(path), lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    _write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def _json_safe(value: tp.Any) -> tp.Any:
    """NaN / inf are not JSON: they become None (an absent value is also explained where it matters)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def json_form(value: tp.Any) -> tp.Any:
    """`value` as it reads back from a JSON file (tuples become lists, NaN None...)."""
    return json.loads(json.dumps(_json_safe(value)))


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove the temporary files (`.<name>.*.tmp`, see `atomic.atomic_write`) that a run killed while
    writing left in `out_dir` and its `sequences/`. Call it under the folder's lock only: a running run's
    temporary files are not stale. Returns what was removed."""
    removed = []
    for folder in (Path(out_dir), Path(out_dir) / SEQUENCES_DIR):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def write_json_atomic(path: str | Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


# Longer ids get a shortened file name: a file name has at most 255 bytes, and the temporary file of an
# atomic write adds about 20 to it.
MAX_FILE_STEM = 120


def results_document(command: str, config: dict, versions: dict, model: dict, codec: dict, books: list[dict],
                     skipped: list[dict], metrics: dict, runtime: dict) -> dict:
    """The content of `results.json`, every key in the order it is written.

    - `command`: the command line of the run, shell-quoted.
    - `created`: when the file was written, UTC, ISO 8601 to the second.
    - `config`: the scoring configuration (what the per-book numbers depend on, as in `config.json`) and the
      run's reporting options (batch size, number of books, report positions, bootstrap...).
    - `versions`: python, torch, moshi, moshi_patch, moshi_eval.
    - `model`: the checkpoint identity (weight files and their sha256, LoRA status), then the LM's shape:
      `n_q`, `dep_q`, `card`, `text_card`, `delays`, `context` (frames of attention), `context_minutes`,
      `text_padding_token_id`.
    - `codec`: Mimi's `identity`, `num_codebooks`, `cardinality`, `sample_rate`, `frame_rate` (frames/s).
    - `num_books`, `books`: the finished books: their id, speaker, book and chapters, `frames`, `minutes`,
      `audio_ce_mean`, `audio_ce_weighted_mean`, `file` (their `.npz`, relative to the run folder) and
      `file_sha256` (its digest when results.json was written: `compare` refuses a book file changed since).
    - `skipped`: books not scored, each with its `reason`.
    - `metrics`: the aggregates over books (per-frame means, report positions, slopes, buckets, bootstrap
      intervals with a `few_books` flag and `note` under 10 books; `longest_book_frames`, `frames_scored`):
      `moshi_eval.metrics.summarize`.
    - `runtime`: frames scored and seconds in this run, frames/s, encode and total seconds, books scored and
      resumed, the code cache's hits and misses, device, processes, chunk statistics.
    - `files` (added by the run as it writes results.json last): the sha256 of `curve.csv` and `curve.png`
      written with it; a run killed between the writes leaves digests that do not match.
    """
    return {
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions,
        "model": model,
        "codec": codec,
        "num_books": len(books),
        "books": books,
        "skipped": skipped,
        "metrics": metrics,
        "runtime": runtime,
    }


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
    extra = {"meta_json": np.asarray(json.dumps(_json_safe(meta)))}
    np.savez(buffer, **{k: np.asarray(arrays[k]) for k in SEQUENCE_ARRAYS}, **extra)
    _write_atomic(path, lambda f: f.write(buffer.getvalue()))
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


def check_or_write_config(out_dir: str | Path, config: dict) -> bool:
    """Store `config` in `<out>/config.json`, or check it equals the stored one.

    Returns True if the directory already had this configuration (a resume). A stored config without
    any finished sequence (a run that failed early) is replaced.
    Raises:
        ConfigMismatchError: `<out>` holds results of another configuration; names the differing keys.
    """
    out_dir = Path(out_dir)
    path = out_dir / CONFIG_JSON
    config = json_form(config)                                   # the form it takes on disk
    has_results = (out_dir / SEQUENCES_DIR).is_dir() and any((out_dir / SEQUENCES_DIR).glob("*.npz"))
    if path.exists() and not has_results:
        # A run that failed before finishing any sequence (bad checkpoint, bad data): nothing to protect.
        path.unlink()
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"cannot read {path}: {exc}. Use another --out, or delete the folder.") from exc
        if stored != config:
            diffs = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, a, b in _differences(stored, config)[:5])
            raise ConfigMismatchError(
                f"--out {out_dir} holds results of another configuration ({diffs}). Use another --out, "
                f"or delete {out_dir} to start over.")
        return True
    if has_results:
        raise ConfigMismatchError(f"--out {out_dir} holds sequence results but no {CONFIG_JSON}: they cannot "
                                  "be attributed to a configuration. Use another --out.")
    write_json_atomic(path, config)
    return False


def _differences(a: tp.Any, b: tp.Any, prefix: str = "") -> list[tuple[str, tp.Any, tp.Any]]:
    """The leaves where two JSON values differ, as (dotted key, value in a, value in b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            found += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return found
    return [] if a == b else [(prefix.rstrip("."), a, b)]


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
    write_text_atomic(path, out.getvalue())


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
    _write_atomic(Path(path), lambda f: f.write(buffer.getvalue()))


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
    from .bootstrap import MIN_BOOKS_FOR_INTERVAL, few_books_note

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
