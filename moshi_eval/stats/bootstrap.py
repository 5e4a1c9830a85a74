"""Bootstrap intervals over books: how much a curve statistic would move with another sample of books.

A run's statistics (the curve at a report position, its window mean, its slope, a bucket mean) are computed
over the books that reach each frame. To see how far they are from what more books would give, books are
resampled with replacement (whole books: the frames of one book are not independent), `resamples` times
from a seeded generator, and each statistic is recomputed on each resample. Reported: the standard error (the
standard deviation over resamples) and the 95% percentile interval.

Resample `r` draws `np.random.default_rng(seed).integers(0, N, size=(resamples, N))[r]`: anyone can redo it.
A resample in which no drawn book reaches a frame has no value there: it is left out (`resamples_used` says
how many counted). Fewer than 2 books reaching a statistic: no interval, with the reason.

Paired comparison (`paired_bootstrap`): two runs scored on the same books; the per-book difference of a
per-book statistic is resampled, which removes the spread between books that both runs share.
"""
from dataclasses import asdict, dataclass
import typing as tp

import numpy as np

from ..stats.metrics import DEFAULT_BUCKET, DEFAULT_HALF_WINDOW, DEFAULT_REPORT_AT

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
LEVEL = 0.95
_BLOCK = 256   # resamples per matrix product: bounded memory on hour-long curves
# Below this many books a percentile bootstrap over books says little: the resamples take few distinct values
# (2 books: 3 means), so its interval is too narrow, not wide. Reported with a note, never hidden.
MIN_BOOKS_FOR_INTERVAL = 10


def few_books_note(num_books: int) -> str | None:
    """Why an interval over `num_books` books is not to be trusted, or None from `MIN_BOOKS_FOR_INTERVAL` on."""
    if num_books >= MIN_BOOKS_FOR_INTERVAL:
        return None
    return (f"only {num_books} book(s): a bootstrap over fewer than {MIN_BOOKS_FOR_INTERVAL} books understates the "
            "uncertainty (its resamples take few distinct values), so the intervals are not meaningful; "
            "score more books")


@dataclass
class Interval:
    """Bootstrap spread of one statistic."""
    present: bool
    num_books: int                  # books that reach the statistic
    se: float | None = None         # standard error: std over resamples (ddof=1)
    low: float | None = None        # 2.5th percentile over resamples
    high: float | None = None       # 97.5th percentile
    resamples_used: int = 0         # resamples where the statistic exists
    absent_reason: str | None = None

    def to_dict(self) -> dict[str, tp.Any]:
        return asdict(self)


def resample_indices(num_books: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_books] int64: the books drawn by each resample."""
    return np.random.default_rng(seed).integers(0, num_books, size=(resamples, num_books))


def _interval(samples: np.ndarray, num_books: int) -> Interval:
    ok = samples[np.isfinite(samples)]
    if ok.size < 2:
        return Interval(False, num_books, absent_reason=f"only {ok.size} resamples reach it")
    low, high = np.percentile(ok, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return Interval(True, num_books, se=float(ok.std(ddof=1)), low=float(low), high=float(high),
                    resamples_used=int(ok.size))


def _absent(num_books: int, what: str) -> Interval:
    return Interval(False, num_books, absent_reason=f"fewer than 2 books reach {what} ({num_books})")


class BookResampler:
    """Resampled curves of per-frame values of N books of different lengths (`[T_i]`, NaN = not scored).

    The curve of a resample is, at each frame, the mean over the drawn books reaching it (a book drawn twice
    counts twice): `(counts @ values) / (counts @ reached)` with `counts [R, N]` the times each book is drawn.
    """

    def __init__(self, values: tp.Sequence[np.ndarray], resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_SEED) -> None:
        if resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {resamples}.")
        arrays = [np.asarray(v, dtype=np.float64) for v in values]
        self.num_books = len(arrays)
        self.num_frames = max(a.shape[0] for a in arrays)
        padded = np.full((self.num_books, self.num_frames), np.nan)
        for i, a in enumerate(arrays):
            padded[i, :a.shape[0]] = a
        self.reached = np.isfinite(padded)                               # [N, T]
        self.filled = np.where(self.reached, padded, 0.0)
        indices = resample_indices(self.num_books, resamples, seed)
        self.counts = np.stack([np.bincount(row, minlength=self.num_books) for row in indices]).astype(np.float64)

    def books_reaching(self, start: int, stop: int) -> int:
        return int(self.reached[:, start:stop].any(axis=1).sum())

    def curves(self, start: int, stop: int) -> tp.Iterator[np.ndarray]:
        """Resampled curves on frames [start, stop), in blocks of resamples: `[r, stop - start]`, NaN where
        no drawn book reaches the frame."""
        values, reached = self.filled[:, start:stop], self.reached[:, start:stop].astype(np.float64)
        for r in range(0, self.counts.shape[0], _BLOCK):
            counts = self.counts[r:r + _BLOCK]
            total, number = counts @ values, counts @ reached
            with np.errstate(invalid="ignore", divide="ignore"):
                yield np.where(number > 0, total / np.maximum(number, 1), np.nan)

    def window_mean(self, start: int, stop: int) -> Interval:
        """Mean of the curve over its reached frames in [start, stop) (a point: stop = start + 1)."""
        books = self.books_reaching(start, stop)
        if books < 2:
            return _absent(books, f"frames {start}..{stop - 1}")
        samples = np.concatenate([_nanmean_rows(curve) for curve in self.curves(start, stop)])
        return _interval(samples, books)

    def slope_per_1000(self) -> Interval:
        """Least-squares slope of the whole curve against the frame, per 1000 frames."""
        if self.num_books < 2:
            return _absent(self.num_books, "the curve")
        x = np.arange(self.num_frames, dtype=np.float64)
        samples = []
        for curve in self.curves(0, self.num_frames):
            samples.append(_masked_slope(x, curve) * 1000.0)
        return _interval(np.concatenate(samples), self.num_books)


def _nanmean_rows(curve: np.ndarray) -> np.ndarray:
    ok = np.isfinite(curve)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(axis=1), np.where(ok, curve, 0.0).sum(axis=1) / np.maximum(ok.sum(axis=1), 1),
                        np.nan)


def _masked_slope(x: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """[r] least-squares slope of each row of `curve` against `x`, over its finite entries (NaN if < 2)."""
    ok = np.isfinite(curve)
    n = ok.sum(axis=1)
    y = np.where(ok, curve, 0.0)
    xs = np.where(ok, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        x_mean = xs.sum(axis=1) / n
        y_mean = y.sum(axis=1) / n
        xc = np.where(ok, x - x_mean[:, None], 0.0)
        slope = (xc * (y - y_mean[:, None])).sum(axis=1) / (xc * xc).sum(axis=1)
    return np.where(n >= 2, slope, np.nan)


def bootstrap_summary(values: tp.Sequence[np.ndarray], report_at: tp.Sequence[int] = DEFAULT_REPORT_AT,
                      half_window: int = DEFAULT_HALF_WINDOW, bucket: int = DEFAULT_BUCKET,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, tp.Any]:
    """Intervals of the statistics of `metrics.summarize` for books `[T_i]`: at each report position the
    point and the window mean (`frame +- half_window`), the slope, and each bucket mean."""
    sampler = BookResampler(values, resamples, seed)
    T = sampler.num_frames
    positions = []
    for frame in report_at:
        if frame >= T:
            point = window = _absent(0, f"frame {frame}")
        else:
            point = sampler.window_mean(frame, frame + 1)
            window = sampler.window_mean(max(0, frame - half_window), min(T, frame + half_window + 1))
        positions.append({"frame": frame, "point": point.to_dict(), "window_mean": window.to_dict()})
    buckets = [dict(sampler.window_mean(start, min(start + bucket, T)).to_dict(), start=start)
               for start in range(0, T, bucket) if sampler.books_reaching(start, min(start + bucket, T)) > 0]
    note = few_books_note(sampler.num_books)
    return {"resamples": resamples, "seed": seed, "level": LEVEL, "num_books": sampler.num_books,
            "few_books": note is not None, "note": note, "positions": positions,
            "slope": sampler.slope_per_1000().to_dict(), "buckets": buckets}


def book_window_mean(values: np.ndarray, frame: int, half_window: int) -> float:
    """One book's own mean over frames `frame +- half_window` it scored (NaN if it does not reach `frame`)."""
    values = np.asarray(values, dtype=np.float64)
    if frame >= values.shape[0] or not np.isfinite(values[frame]):
        return float("nan")
    window = values[max(0, frame - half_window): frame + half_window + 1]
    return float(np.nanmean(window))


def book_slope_per_1000(values: np.ndarray) -> float:
    """One book's own least-squares slope per 1000 frames."""
    values = np.asarray(values, dtype=np.float64)
    return float(_masked_slope(np.arange(values.shape[0], dtype=np.float64), values[None])[0] * 1000.0)


def paired_bootstrap(differences: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> Interval:
    """Interval of the mean of per-book differences `[N]` (NaN: the book does not count), books resampled."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return _absent(int(d.size), "both runs' statistic")
    indices = resample_indices(d.size, resamples, seed)
    return _interval(d[indices].mean(axis=1), int(d.size))


def bucket_band(values: list[np.ndarray], bucket: int, resamples: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bucket centres (frames), bucket means of the curve and their 95% bootstrap band (NaN if < 2 books)."""
    sampler = BookResampler(values, resamples, seed)
    from ..stats.metrics import frame_mean
    curve = frame_mean(values)
    xs, means, lows, highs = [], [], [], []
    for start in range(0, sampler.num_frames, bucket):
        stop = min(start + bucket, sampler.num_frames)
        reached = curve.count[start:stop] > 0
        if not reached.any():
            continue
        interval = sampler.window_mean(start, stop)
        xs.append((start + stop) / 2)
        means.append(float(curve.mean[start:stop][reached].mean()))
        lows.append(interval.low if interval.present else np.nan)
        highs.append(interval.high if interval.present else np.nan)
    return tuple(np.asarray(a, dtype=np.float64) for a in (xs, means, lows, highs))   # type: ignore[return-value]
