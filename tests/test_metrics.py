"""moshi_eval.stats.metrics against numpy computations written out frame by frame."""
import math

import numpy as np
import pytest

from moshi_eval.stats.metrics import bucket_means, frame_mean, slope_per_1000, summarize, value_at


@pytest.fixture
def sequences():
    rng = np.random.default_rng(0)
    return [rng.normal(5.0, 1.0, size=n) - 1e-4 * np.arange(n) for n in (2600, 1800, 900)]


def test_frame_mean_counts_only_sequences_reaching_the_frame(sequences):
    curve = frame_mean(sequences)
    assert curve.num_frames == 2600
    for t in (0, 899, 900, 1799, 1800, 2599):
        present = [s[t] for s in sequences if t < len(s)]
        assert curve.count[t] == len(present)
        assert curve.mean[t] == pytest.approx(sum(present) / len(present), rel=1e-12)


def test_frame_mean_ignores_nan_entries():
    curve = frame_mean([np.array([1.0, np.nan, 3.0]), np.array([3.0, 5.0])])
    assert curve.count.tolist() == [2, 1, 1]
    assert curve.mean.tolist() == [2.0, 5.0, 3.0]


def test_value_at_point_and_window(sequences):
    curve = frame_mean(sequences)
    v = value_at(curve, 1000, half_window=250)
    assert v.present and v.point_count == 2
    assert v.point == pytest.approx((sequences[0][1000] + sequences[1][1000]) / 2)
    per_frame = [np.mean([s[t] for s in sequences if t < len(s)]) for t in range(750, 1251)]
    assert v.window_mean == pytest.approx(np.mean(per_frame), rel=1e-12)
    assert (v.window_start, v.window_end) == (750, 1250)
    # Near the end the window is clipped to the frames some sequence reaches.
    end = value_at(curve, 2500, half_window=250)
    assert (end.window_start, end.window_end) == (2250, 2599)
    assert end.window_mean == pytest.approx(sequences[0][2250:2600].mean(), rel=1e-12)


def test_position_nobody_reaches_is_absent_with_reason(sequences):
    curve = frame_mean(sequences)
    v = value_at(curve, 8000)
    assert not v.present
    assert v.point is None and v.window_mean is None
    assert "8000" in v.absent_reason and "2600" in v.absent_reason


def test_slope_matches_polyfit(sequences):
    curve = frame_mean(sequences)
    ref = np.polyfit(np.arange(2600), curve.mean, 1)[0] * 1000
    s = slope_per_1000(curve)
    assert s.present and s.frames == 2600
    assert s.per_1000_frames == pytest.approx(ref, rel=1e-9)
    # A linear curve gives its exact slope.
    lin = frame_mean([3.0 - 0.002 * np.arange(500)])
    assert slope_per_1000(lin).per_1000_frames == pytest.approx(-2.0, rel=1e-9)
    one = slope_per_1000(frame_mean([np.array([1.0])]))
    assert not one.present and one.per_1000_frames is None and "2 frames" in one.absent_reason


def test_bucket_means(sequences):
    curve = frame_mean(sequences)
    buckets = bucket_means(curve, 1000)
    assert [(b.start, b.end, b.frames) for b in buckets] == [(0, 1000, 1000), (1000, 2000, 1000),
                                                              (2000, 3000, 600)]
    for b in buckets:
        hand = np.mean([np.mean([s[t] for s in sequences if t < len(s)])
                        for t in range(b.start, min(b.end, 2600))])
        assert b.mean == pytest.approx(hand, rel=1e-12)
    assert [b.min_count for b in buckets] == [2, 1, 1]


def test_summarize_mean_is_pooled_and_positions_listed(sequences):
    summ = summarize(sequences, report_at=(100, 2000, 8000))
    assert summ.num_sequences == 3 and summ.num_frames == 2600
    assert summ.mean == pytest.approx(np.concatenate(sequences).mean(), rel=1e-12)
    assert [p.present for p in summ.positions] == [True, True, False]
    d = summ.to_dict()
    assert d["positions"][2]["point"] is None
    assert not any(isinstance(x, float) and math.isnan(x) for x in d["positions"][0].values())


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one sequence"):
        frame_mean([])
    with pytest.raises(ValueError, match="1-D"):
        frame_mean([np.zeros((2, 3))])
    with pytest.raises(ValueError, match="bucket size"):
        bucket_means(frame_mean([np.zeros(3)]), 0)
    with pytest.raises(ValueError, match="report position"):
        value_at(frame_mean([np.zeros(3)]), -1)
