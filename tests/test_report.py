"""moshi_eval.files.report: atomic sequence files, config guard, curve.csv against numpy, the plot."""
import csv
import json

import numpy as np
import pytest

from moshi_eval.files import atomic
from moshi_eval.files import report
from moshi_eval.files.folder import ConfigMismatchError, OutputFolder, write_json


def _arrays(T, K=8, seed=0):
    rng = np.random.default_rng(seed)
    cb = rng.uniform(1, 9, size=(K, T)).astype(np.float32)
    w = np.ones(K)
    w[0] = 100
    return {"audio_ce": cb.mean(0), "audio_ce_weighted": (cb * w[:, None]).sum(0) / w.sum(),
            "codebook_ce": cb, "text_token": rng.integers(0, 50, size=T)}


def test_sequence_roundtrip_is_atomic(tmp_path):
    arrays = _arrays(17)
    path = report.write_sequence(tmp_path, "spk__book", arrays)
    assert path == tmp_path / "sequences" / "spk__book.npz"
    back = report.read_sequence(path)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
    # Only the final file is left: no temporary file next to it.
    assert [p.name for p in (tmp_path / "sequences").iterdir()] == ["spk__book.npz"]


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    report.write_sequence(tmp_path, "a", _arrays(5))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        report.write_sequence(tmp_path, "a", _arrays(9, seed=1))
    assert report.read_sequence(tmp_path / "sequences" / "a.npz")["audio_ce"].shape == (5,)
    assert len(list((tmp_path / "sequences").iterdir())) == 1


def test_bad_sequence_arrays_and_files(tmp_path):
    bad = _arrays(5)
    bad["text_token"] = bad["text_token"][:4]
    with pytest.raises(report.ReportError, match="text_token must have shape"):
        report.write_sequence(tmp_path, "x", bad)
    missing = _arrays(5)
    del missing["codebook_ce"]
    with pytest.raises(report.ReportError, match="missing arrays"):
        report.write_sequence(tmp_path, "x", missing)
    corrupt = tmp_path / "c.npz"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(report.ReportError, match="cannot read sequence file .*c.npz"):
        report.read_sequence(corrupt)


def _check_config(out, config, task="librilight"):
    with OutputFolder(out, task) as folder:
        return folder.check_config(config)


def test_config_guard(tmp_path):
    """Config.json of a folder: replaced while it protects no result, checked once it does; a folder of results
    without one, or of another task, is refused."""
    cfg = {"model": {"path": "/m", "size": 3}, "text": "pad", "max_frames": None}
    assert _check_config(tmp_path, cfg) is False
    # No finished sequence yet (e.g. the first run failed on a bad checkpoint): another config replaces it.
    assert _check_config(tmp_path, dict(cfg, text="predicted")) is False
    assert _check_config(tmp_path, cfg) is False
    report.write_sequence(tmp_path, "a", _arrays(3))
    assert _check_config(tmp_path, dict(cfg)) is True
    with pytest.raises(ConfigMismatchError, match="text: stored 'pad', now 'predicted'"):
        _check_config(tmp_path, dict(cfg, text="predicted"))
    with pytest.raises(ConfigMismatchError, match="holds a librilight run, and this is a likelihood run"):
        _check_config(tmp_path, dict(cfg), task="likelihood")
    # Results without a stored config cannot be attributed: refused too.
    other = tmp_path / "other"
    report.write_sequence(other, "a", _arrays(3))
    with pytest.raises(ConfigMismatchError, match="no config.json"):
        _check_config(other, cfg)


def test_json_has_no_nan(tmp_path):
    write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [1.0, None], "c": 2.0}


def test_curve_csv_matches_numpy(tmp_path):
    seqs = {"a": _arrays(30, seed=1), "b": _arrays(12, seed=2)}
    report.write_curve_csv(tmp_path / "curve.csv", seqs, frame_rate=12.5)
    rows = list(csv.DictReader((tmp_path / "curve.csv").open()))
    assert len(rows) == 30
    for t in (0, 11, 12, 29):
        row = rows[t]
        present = [s for s in seqs.values() if t < len(s["audio_ce"])]
        assert int(row["frame"]) == t and int(row["num_sequences"]) == len(present)
        assert float(row["minutes"]) == pytest.approx(t / 12.5 / 60, abs=1e-5)
        assert float(row["audio_ce"]) == pytest.approx(np.mean([s["audio_ce"][t] for s in present]), abs=1e-5)
        assert float(row["audio_ce_weighted"]) == pytest.approx(
            np.mean([s["audio_ce_weighted"][t] for s in present]), abs=1e-5)
        assert float(row["codebook_3_ce"]) == pytest.approx(
            np.mean([s["codebook_ce"][3, t] for s in present]), abs=1e-5)


def test_moving_average_is_trailing_mean():
    y = np.arange(10, dtype=np.float64)
    got = report._moving_average(y, 3)
    ref = [np.mean(y[max(0, t - 2): t + 1]) for t in range(10)]
    np.testing.assert_allclose(got, ref)


def test_plot_writes_png(tmp_path):
    seqs = {"a": _arrays(300)["audio_ce"], "b": _arrays(200, seed=3)["audio_ce"]}
    report.plot_curve(tmp_path / "curve.png", seqs, frame_rate=12.5, context=100, title="t")
    data = (tmp_path / "curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(report.ReportError, match="no finished sequence"):
        report.plot_curve(tmp_path / "x.png", {}, 12.5, None)


def _lines_by_label(fig):
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


def test_curve_band_and_mean_line_are_the_same_quantity():
    """With a band, the black line is the bucket means the band is around (recomputed here from the books),
    not a moving average of another width."""
    import matplotlib.pyplot as plt
    from moshi_eval.stats.bootstrap import bucket_band
    rng = np.random.default_rng(4)
    books = [rng.normal(5, 1) + rng.normal(0, 0.3, n) for n in (260, 230, 120)]
    band = bucket_band(books, 50, 200, 0)
    fig = report.curve_figure({f"b{i}": v for i, v in enumerate(books)}, 12.5, None, band=band, bucket=50)
    try:
        lines = _lines_by_label(fig)
        mean_line = lines["mean over the books reaching each frame, 50-frame bucket means"]
        expected = []
        for start in range(0, 260, 50):
            per_frame = [np.mean([b[t] for b in books if t < len(b)]) for t in range(start, min(start + 50, 260))]
            expected.append(np.mean(per_frame))
        np.testing.assert_allclose(mean_line.get_ydata(), expected, rtol=1e-12)
        np.testing.assert_allclose(mean_line.get_xdata(), band[0] / 12.5 / 60)
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert any(label.startswith("95% bootstrap band over books of those bucket means") for label in labels)
        # Without a band, the mean line says which moving average it is.
        fig2 = report.curve_figure({f"b{i}": v for i, v in enumerate(books)}, 12.5, None)
        assert "mean over the books reaching each frame, moving average over 5 frames" in _lines_by_label(fig2)
        plt.close(fig2)
    finally:
        plt.close(fig)


def test_curve_shows_how_many_books_reach_each_frame():
    import matplotlib.pyplot as plt
    books = {"long": np.full(300, 5.0), "short": np.full(120, 6.0)}
    fig = report.curve_figure(books, 12.5, None)
    try:
        count = _lines_by_label(fig)["books reaching the frame"]
        frames = np.round(np.asarray(count.get_xdata()) * 12.5 * 60).astype(int)
        expected = [sum(len(v) > t for v in books.values()) for t in frames]
        np.testing.assert_array_equal(count.get_ydata(), expected)
        assert set(np.asarray(count.get_ydata()).tolist()) == {1, 2}
    finally:
        plt.close(fig)


def test_few_books_are_flagged_in_the_summary_and_the_plot():
    import matplotlib.pyplot as plt
    from moshi_eval.stats.bootstrap import MIN_BOOKS_FOR_INTERVAL, bootstrap_summary, bucket_band
    rng = np.random.default_rng(5)
    two = [rng.normal(5, 0.3, 200) for _ in range(2)]
    summary = bootstrap_summary(two, (50,), 10, 50, 100, 0)
    assert summary["few_books"] and "only 2 book(s)" in summary["note"] and "not meaningful" in summary["note"]
    many = [rng.normal(5, 0.3, 200) for _ in range(MIN_BOOKS_FOR_INTERVAL)]
    summary = bootstrap_summary(many, (50,), 10, 50, 100, 0)
    assert not summary["few_books"] and summary["note"] is None
    fig = report.curve_figure({"a": two[0], "b": two[1]}, 12.5, None, band=bucket_band(two, 50, 100, 0))
    try:
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert any("only 2 books: NOT meaningful" in label for label in labels)
        assert "only 2 book(s): an interval over fewer than" in fig.axes[0].get_title()
    finally:
        plt.close(fig)
