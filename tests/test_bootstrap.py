"""Bootstrap intervals over books and `moshi-eval compare`, against independent numpy computations."""
import json
from pathlib import Path
import shutil

import numpy as np
import pytest

from moshi_eval.files import report
from moshi_eval.files.folder import write_json
from moshi_eval.stats.bootstrap import (BookResampler, book_slope_per_1000, book_window_mean, bootstrap_summary,
                                        paired_bootstrap)
from moshi_eval.cli.commands import main
from moshi_eval.compare.librilight import CompareError, compare, load_run, markdown_table
from moshi_eval.stats.metrics import summarize


def _books(num: int, seed: int, lengths=(40, 90)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(5.0, 1.0) + rng.normal(0, 0.3, rng.integers(*lengths)) for _ in range(num)]


def test_bootstrap_equals_an_independent_resampling():
    """Each interval equals the one computed by resampling the books by hand with the same generator and
    recomputing `metrics.summarize` (an independent code path) on every resample."""
    books = _books(7, seed=1)
    resamples, seed, report_at, half, bucket = 300, 11, (10, 50, 85), 4, 20
    got = bootstrap_summary(books, report_at, half, bucket, resamples, seed)
    indices = np.random.default_rng(seed).integers(0, len(books), size=(resamples, len(books)))
    stats: dict[str, list[float]] = {}
    for row in indices:
        summary = summarize([books[i] for i in row], report_at, half, bucket)
        for p in summary.positions:
            if p.present:
                stats.setdefault(f"point{p.frame}", []).append(p.point)
                stats.setdefault(f"window{p.frame}", []).append(p.window_mean)
        stats.setdefault("slope", []).append(summary.slope.per_1000_frames)
        for b in summary.buckets:
            stats.setdefault(f"bucket{b.start}", []).append(b.mean)

    def check(interval: dict, samples: list[float]) -> None:
        samples = np.asarray(samples)
        assert interval["present"] and interval["resamples_used"] == samples.size
        assert interval["se"] == pytest.approx(samples.std(ddof=1), rel=1e-9)
        low, high = np.percentile(samples, [2.5, 97.5])
        assert (interval["low"], interval["high"]) == pytest.approx((low, high), rel=1e-9)

    reaching = {f: sum(len(x) > f for x in books) for f in report_at}
    assert reaching[10] == 7 and reaching[85] < 2
    for position in got["positions"]:
        if reaching[position["frame"]] < 2:     # one book reaches it: no interval, never a zero-width one
            assert not position["point"]["present"] and "fewer than 2 books" in position["point"]["absent_reason"]
            continue
        check(position["point"], stats[f"point{position['frame']}"])
        check(position["window_mean"], stats[f"window{position['frame']}"])
    check(got["slope"], stats["slope"])
    assert len(got["buckets"]) == 5
    for b in got["buckets"]:
        check(b, stats[f"bucket{b['start']}"])
    # Frame 50 is reached by fewer books: some resamples draw none of them and do not count.
    assert got["positions"][1]["point"]["resamples_used"] <= resamples


def test_fewer_than_two_books_is_absent_with_the_reason():
    books = [np.ones(50), np.ones(20)]
    got = bootstrap_summary(books, (10, 30, 60), 2, 10, 100, 0)
    assert got["positions"][0]["point"]["present"]
    for position in got["positions"][1:]:
        interval = position["point"]
        assert not interval["present"] and interval["se"] is None and interval["low"] is None
        assert "fewer than 2 books" in interval["absent_reason"]


def test_paired_interval_covers_the_true_difference_and_is_narrower():
    """Synthetic runs: run B = run A - 0.1 + small noise, books with a large spread between them."""
    rng = np.random.default_rng(3)
    true_difference = -0.1
    a = [rng.normal(5.0, 1.0) + rng.normal(0, 0.2, 200) for _ in range(40)]
    b = [x + true_difference + rng.normal(0, 0.05, x.shape) for x in a]
    diffs = np.array([book_window_mean(y, 100, 50) - book_window_mean(x, 100, 50) for x, y in zip(a, b)])
    paired = paired_bootstrap(diffs, 2000, 0)
    assert paired.low < true_difference < paired.high
    # Unpaired: the two runs' window means resampled independently.
    ra = BookResampler(a, 2000, 1).window_mean(50, 151)
    rb = BookResampler(b, 2000, 2).window_mean(50, 151)
    unpaired_width = 2 * 1.96 * np.hypot(ra.se, rb.se)
    assert paired.high - paired.low < unpaired_width / 5


def test_identical_runs_differ_by_exactly_zero():
    books = _books(6, seed=4)
    interval = paired_bootstrap(np.array([book_slope_per_1000(x) - book_slope_per_1000(x) for x in books]), 500, 0)
    assert interval.present and interval.low == interval.high == 0.0 and interval.se == 0.0


def _fake_run(path: Path, books: dict[str, np.ndarray], **config) -> Path:
    """A finished run folder: npz files and a results.json listing them."""
    entries = []
    for sid, values in books.items():
        arrays = {"audio_ce": values.astype(np.float32), "audio_ce_weighted": values.astype(np.float32),
                  "codebook_ce": np.tile(values.astype(np.float32), (8, 1)), "text_token": np.zeros(len(values), int)}
        file = report.write_sequence(path, sid, arrays, {"sequence_id": sid})
        entries.append({"sequence_id": sid, "file": str(file.relative_to(path))})
    base = {"text": "predicted", "user_stream": "silence", "max_frames": None, "max_chapters": None,
            "first_codebook_weight": 100.0}
    write_json(path / "results.json", {"config": dict(base, **config), "books": entries,
                                       "model": {"context": 30}, "codec": {"frame_rate": 12.5}})
    return path


def test_compare_table_equals_a_recomputation_and_handles_partial_overlap(tmp_path, capsys):
    rng = np.random.default_rng(5)
    a = {f"book{i}": rng.normal(5, 1) + rng.normal(0, 0.1, rng.integers(60, 100)) for i in range(6)}
    b = {k: v - 0.2 + rng.normal(0, 0.02, v.shape) for k, v in a.items() if k != "book0"}
    b["extra"] = rng.normal(5, 0.1, 80)
    run_a, run_b = _fake_run(tmp_path / "a", a), _fake_run(tmp_path / "b", b)
    out = tmp_path / "cmp"
    code = main(["compare", str(run_a), str(run_b), "--names", "base,ttt", "--out", str(out),
                 "--report-at", "20,50", "--report-window", "5", "--bucket", "10", "--bootstrap", "500"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "5 shared books" in printed and "left out" in printed
    result = json.loads((out / "compare.json").read_text())
    shared = sorted(set(a) & set(b))
    assert result["shared_books"] == shared
    assert result["left_out"] == {"base": ["book0"], "ttt": ["extra"]}
    # Recompute the table's numbers from the npz files.
    for position, frame in zip(result["runs"][1]["positions"], (20, 50)):
        curve_a = np.mean([a[s][frame - 5: frame + 6] for s in shared], axis=0)
        curve_b = np.mean([b[s][frame - 5: frame + 6] for s in shared], axis=0)
        assert position["window_mean"] == pytest.approx(curve_b.mean(), abs=1e-5)
        d = [b[s][frame - 5: frame + 6].mean() - a[s][frame - 5: frame + 6].mean() for s in shared]
        assert position["paired"]["mean_difference"] == pytest.approx(np.mean(d), abs=1e-5)
        assert position["paired"]["share_lower"] == 1.0
        assert position["paired"]["interval"]["high"] < 0
        assert result["runs"][0]["positions"][frame == 50]["window_mean"] == pytest.approx(curve_a.mean(), abs=1e-5)
    table = (out / "compare.md").read_text()
    assert table == markdown_table(result) and "| frame 20 (+-5) |" in table and "ttt - base" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "compare.csv").read_text().count("\n") == 1 + 2 * 3


def test_compare_refuses_runs_scored_differently(tmp_path, capsys):
    books = {f"b{i}": np.full(30, 5.0 + i) for i in range(3)}
    run_a = _fake_run(tmp_path / "a", books)
    run_b = _fake_run(tmp_path / "b", books, text="pad")
    with pytest.raises(CompareError, match="text is 'predicted' in .* and 'pad'"):
        compare([load_run(run_a, "a"), load_run(run_b, "b")], "a", (10,), 2, 10, 100, 0)
    assert main(["compare", str(run_a), str(run_b), "--out", str(tmp_path / "c")]) == 1
    assert "Only the model may differ" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_intervals_and_two_demo_runs_compare(tmp_path, capsys):
    outs = []
    for seed, chunk in ((0, "128"), (0, "1"), (1, "128")):
        out = tmp_path / f"demo{seed}_{chunk}"
        assert main(["demo", "--out", str(out), "--seed", str(seed), "--max-frames", "300", "--no-progress",
                     "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "200", "--log-x", "--chunk", chunk]) == 0
        outs.append(out)
    results = json.loads((outs[0] / "results.json").read_text())
    boot = results["summary"]["audio_ce"]["bootstrap"]
    assert boot["resamples"] == 200 and boot["num_books"] == 2
    assert boot["positions"][0]["point"]["present"] and boot["slope"]["present"]
    assert "bootstrap" in results["summary"]["codebook_ce"][3]
    cmp = tmp_path / "cmp"
    # Without --report-at / --report-window: the runs' own (the demo's 125,250,500 +- 25).
    assert main(["compare", *map(str, outs[:2]), "--out", str(cmp), "--bucket", "100", "--bootstrap", "200"]) == 0
    result = json.loads((cmp / "compare.json").read_text())
    assert result["report_at"] == results["config"]["report_at"] == [125, 250, 500] and result["half_window"] == 25
    assert result["runs"][1]["positions"][0]["paired"]["books"] == 2
    assert result["pairing"] == "sha256 of the chapters"
    shutil.rmtree(cmp)
    capsys.readouterr()
    # Seed 1 is another codec too (the demo seeds the codec): other targets, refused.
    assert main(["compare", str(outs[0]), str(outs[2]), "--out", str(cmp)]) == 1
    assert "different codecs" in capsys.readouterr().err and not cmp.exists()
    # Model seed 1 over codec seed 0: another model, the same targets, compared.
    other = tmp_path / "demo1_codec0"
    assert main(["demo", "--out", str(other), "--seed", "1", "--codec-seed", "0", "--max-frames", "300",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "200"]) == 0
    assert main(["compare", str(outs[0]), str(other), "--out", str(cmp), "--bootstrap", "200"]) == 0
    result = json.loads((cmp / "compare.json").read_text())
    assert result["runs"][1]["positions"][0]["paired"]["mean_difference"] != 0
