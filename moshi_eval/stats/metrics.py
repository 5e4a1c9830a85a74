"""Aggregation of per-frame losses across sequences of different lengths.

Every statistic is computed over the sequences that actually reach a frame. A position that no sequence
reaches is reported absent, with the reason, never as 0.0.
"""
from dataclasses import asdict, dataclass, field
import typing as tp

import numpy as np

DEFAULT_REPORT_AT = (8000, 16000, 24000)
DEFAULT_HALF_WINDOW = 250
DEFAULT_BUCKET = 1000


@dataclass
class Curve:
    """Per-frame mean over the sequences that reach each frame."""
    mean: np.ndarray   # [T_max] float64; NaN where count == 0 (no sequence has a finite value there)
    count: np.ndarray  # [T_max] int64: number of sequences with a finite value at that frame

    @property
    def num_frames(self) -> int:
        return int(self.mean.shape[0])


@dataclass
class PositionValue:
    """The curve at `frame` (the frame predicted with `frame` frames of context before it)."""
    frame: int
    present: bool
    point: float | None = None           # curve mean at `frame`
    point_count: int | None = None       # sequences reaching `frame`
    window_mean: float | None = None     # mean of the curve over [window_start, window_end]
    window_start: int | None = None      # inclusive; clipped to the frames some sequence reaches
    window_end: int | None = None        # inclusive
    absent_reason: str | None = None


@dataclass
class Bucket:
    start: int          # first frame (inclusive)
    end: int            # nominal end, start + bucket size (exclusive); `frames` says how many are reached
    mean: float         # mean of the curve over the bucket's reached frames
    frames: int         # reached frames in the bucket (< end - start for the last, partial bucket)
    min_count: int      # fewest sequences at any of those frames


@dataclass
class Slope:
    present: bool
    per_1000_frames: float | None = None   # least-squares slope of the curve, loss units per 1000 frames
    frames: int = 0                         # frames used in the fit
    absent_reason: str | None = None


@dataclass
class CurveSummary:
    num_sequences: int
    num_frames: int                   # longest sequence ("longest_book_frames" in results.json)
    mean: float | None                # mean over every (sequence, frame) value
    frames_scored: int = 0            # (sequence, frame) values with a finite loss: what `mean` averages
    positions: list[PositionValue] = field(default_factory=list)
    slope: Slope = field(default_factory=lambda: Slope(present=False))
    buckets: list[Bucket] = field(default_factory=list)

    def to_dict(self) -> dict[str, tp.Any]:
        """As results.json holds it: `num_frames` is named `longest_book_frames` there, beside
        `frames_scored` (the (book, frame) values averaged into `mean`)."""
        return {("longest_book_frames" if k == "num_frames" else k): v for k, v in asdict(self).items()}


def frame_mean(values: tp.Sequence[np.ndarray]) -> Curve:
    """Per-frame mean of sequences `[T_i]` of different lengths, over the sequences that reach each frame.

    NaN entries (frames a sequence did not score) are not counted.
    """
    if len(values) == 0:
        raise ValueError("frame_mean needs at least one sequence, got none.")
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"frame_mean: sequence {i} must be a 1-D array [T], got shape {a.shape}.")
    T = max(a.shape[0] for a in arrays)
    total = np.zeros(T, dtype=np.float64)
    count = np.zeros(T, dtype=np.int64)
    for a in arrays:
        ok = np.isfinite(a)
        total[: a.shape[0]] += np.where(ok, a, 0.0)
        count[: a.shape[0]] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return Curve(mean=mean, count=count)


def value_at(curve: Curve, frame: int, half_window: int = DEFAULT_HALF_WINDOW) -> PositionValue:
    """Point value at `frame` and the mean of the curve over `frame +- half_window` (reached frames)."""
    if frame < 0:
        raise ValueError(f"report position must be >= 0, got {frame}.")
    reached = curve.count > 0
    if frame >= curve.num_frames or not reached[frame]:
        return PositionValue(
            frame=frame, present=False,
            absent_reason=f"no sequence reaches frame {frame} (longest has {curve.num_frames} frames)")
    lo = max(0, frame - half_window)
    hi = min(curve.num_frames - 1, frame + half_window)
    window = curve.mean[lo: hi + 1][reached[lo: hi + 1]]
    return PositionValue(frame=frame, present=True, point=float(curve.mean[frame]),
                         point_count=int(curve.count[frame]), window_mean=float(window.mean()),
                         window_start=lo, window_end=hi)


def slope_per_1000(curve: Curve) -> Slope:
    """Least-squares slope of the per-frame mean against the frame index, times 1000."""
    frames = np.nonzero(curve.count > 0)[0]
    if frames.shape[0] < 2:
        return Slope(present=False, frames=int(frames.shape[0]),
                     absent_reason=f"a slope needs at least 2 frames, got {frames.shape[0]}")
    x = frames.astype(np.float64)
    y = curve.mean[frames]
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    return Slope(present=True, per_1000_frames=slope * 1000.0, frames=int(frames.shape[0]))


def bucket_means(curve: Curve, size: int = DEFAULT_BUCKET) -> list[Bucket]:
    """Mean of the curve over consecutive buckets of `size` frames; buckets no sequence reaches are left out."""
    if size <= 0:
        raise ValueError(f"bucket size must be positive, got {size}.")
    buckets = []
    for start in range(0, curve.num_frames, size):
        end = min(start + size, curve.num_frames)
        reached = curve.count[start:end] > 0
        if not reached.any():
            continue
        buckets.append(Bucket(start=start, end=start + size, mean=float(curve.mean[start:end][reached].mean()),
                              frames=int(reached.sum()), min_count=int(curve.count[start:end][reached].min())))
    return buckets


def summarize(values: tp.Sequence[np.ndarray], report_at: tp.Sequence[int] = DEFAULT_REPORT_AT,
              half_window: int = DEFAULT_HALF_WINDOW, bucket: int = DEFAULT_BUCKET) -> CurveSummary:
    """Every aggregate of one per-frame quantity (e.g. `audio_ce`) over sequences `[T_i]`."""
    curve = frame_mean(values)
    finite = [np.asarray(v, dtype=np.float64) for v in values]
    pooled = np.concatenate([v[np.isfinite(v)] for v in finite])
    return CurveSummary(
        num_sequences=len(values), num_frames=curve.num_frames,
        mean=float(pooled.mean()) if pooled.size else None, frames_scored=int(pooled.size),
        positions=[value_at(curve, p, half_window) for p in report_at],
        slope=slope_per_1000(curve), buckets=bucket_means(curve, bucket))
