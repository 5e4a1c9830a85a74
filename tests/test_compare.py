"""`moshi-eval compare` on runs it must not mix: busy or stale run folders, books of the same name over other
audio, other codecs, a run against itself, folders of the same name, the runs' own report positions."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from moshi_eval.files import report
from moshi_eval.files.folder import write_json
from moshi_eval.cli.commands import main
from moshi_eval.cli.compare import run_names
from moshi_eval.compare.librilight import CompareError, compare, load_run
from moshi_eval.errors import EXIT_USAGE
from moshi_eval.files.lock import OutputLock


def _chapters(audio: str) -> list[dict]:
    """The chapter identity a book file records (as `FileHasher.identity`), of made-up audio `audio`."""
    return [{"path": f"/data/{audio}/{i}.flac", "size": 10, "mtime_ns": 1, "sha256": f"{audio}{i}".ljust(64, "0")}
            for i in range(2)]


def fake_run(path: Path, books: dict[str, np.ndarray], audio: dict[str, str] | None = None,
             codec: str = "c0", with_sha: bool = True, **config) -> Path:
    """A finished run folder as `run.py` writes it: book files (with their chapters' identity when `audio`
    names each book's audio) and a results.json listing them with their sha256."""
    entries = []
    for sid, values in books.items():
        arrays = {"audio_ce": values.astype(np.float32), "audio_ce_weighted": values.astype(np.float32),
                  "codebook_ce": np.tile(values.astype(np.float32), (8, 1)), "text_token": np.zeros(len(values), int)}
        meta = {"sequence_id": sid}
        if audio is not None:
            meta["chapters"] = _chapters(audio[sid])
        file = report.write_sequence(path, sid, arrays, meta)
        entry = {"sequence_id": sid, "file": str(file.relative_to(path)), "frames": len(values)}
        if with_sha:
            entry["file_sha256"] = report_sha(file)
        entries.append(entry)
    base = {"text": "predicted", "user_stream": "silence", "max_frames": None, "max_chapters": None,
            "first_codebook_weight": 100.0, "audio_dir": "/data", "report_at": [10, 20], "report_window": 3}
    write_json(path / "results.json", {"config": dict(base, **config), "books": entries,
                                       "model": {"context": 30},
                                       "codec": {"frame_rate": 12.5, "identity": codec}})
    return path


def report_sha(file: Path) -> str:
    import hashlib
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _books(seed: int, n: int = 4, lengths=(40, 60)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"spk{i}__book": rng.normal(5, 1) + rng.normal(0, 0.2, rng.integers(*lengths)) for i in range(n)}


def _args(runs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["compare", *map(str, runs), "--out", str(out), "--bootstrap", "100", *extra]


# Item 2: a run being written, or a results.json older than its book files.

def test_compare_refuses_a_run_folder_held_by_a_run(tmp_path, capsys):
    books = _books(0)
    a = fake_run(tmp_path / "a", books, {k: k for k in books})
    b = fake_run(tmp_path / "b", books, {k: k for k in books})
    with OutputLock(b, "moshi-eval librilight --out b (rescoring)"):
        with pytest.raises(CompareError, match=r"writing this folder \(pid \d+, started .*rescoring"):
            load_run(b, "b")
        assert main(_args([a, b], tmp_path / "cmp")) == 1
        assert "rescoring" in capsys.readouterr().err and not (tmp_path / "cmp").exists()
    # Once the run is over, the folder compares (and compare itself leaves it free for the next run).
    assert main(_args([a, b], tmp_path / "cmp")) == 0
    with OutputLock(b, "next run"):
        pass


def test_compare_refuses_book_files_rewritten_after_results_json(tmp_path, capsys):
    """An interrupted rescoring: one book file replaced, results.json still the old one."""
    books = _books(1)
    audio = {k: k for k in books}
    a = fake_run(tmp_path / "a", books, audio)
    b = fake_run(tmp_path / "b", books, audio)
    sid = "spk2__book"
    new = {"audio_ce": books[sid] + 1, "audio_ce_weighted": books[sid] + 1,
           "codebook_ce": np.tile(books[sid] + 1, (8, 1)), "text_token": np.zeros(len(books[sid]), int)}
    path = report.write_sequence(b, sid, new, {"sequence_id": sid, "chapters": _chapters(sid)})
    stat = (b / "results.json").stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))    # not even newer: the digest tells
    with pytest.raises(CompareError, match=f"results.json does not match the book file .*{sid}.npz.*sha256"):
        load_run(b, "b")
    assert main(_args([a, b], tmp_path / "cmp")) == 1
    assert "Rerun that run's command" in capsys.readouterr().err


def test_results_json_without_digests_refuses_newer_book_files(tmp_path):
    books = _books(2)
    b = fake_run(tmp_path / "b", books, with_sha=False)
    assert len(load_run(b, "b").books) == 4
    path = report.sequence_path(b, "spk0__book")
    stat = (b / "results.json").stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CompareError, match="written after results.json"):
        load_run(b, "b")


def test_a_real_run_records_its_book_files_digests(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-frames", "60", "--no-progress", "--bootstrap", "20",
                 "--cache-dir", str(tmp_path / "cache"), "--report-at", "20,40", "--report-window", "5"]) == 0
    results = json.loads((out / "results.json").read_text())
    for book in results["books"]:
        assert book["file_sha256"] == report_sha(out / book["file"])
    # A stale book file is caught in a real run folder too.
    first = results["books"][0]
    arrays, meta = report.read_sequence(out / first["file"], with_meta=True)
    arrays["audio_ce"] = arrays["audio_ce"] + 1
    report.write_sequence(out, first["sequence_id"], arrays, meta)
    with pytest.raises(CompareError, match="does not match the book file"):
        load_run(out, "demo")


# Item 3: pairing on the audio, not the name; other codecs.

def test_books_of_the_same_name_over_other_audio_are_not_paired(tmp_path, capsys):
    books_a, books_b = _books(3, lengths=(70, 75)), _books(4, lengths=(35, 40))
    a = fake_run(tmp_path / "a", books_a, {k: "libriA" + k for k in books_a}, audio_dir="/dataA")
    b = fake_run(tmp_path / "b", books_b, {k: "libriB" + k for k in books_b}, audio_dir="/dataB")
    assert set(books_a) == set(books_b)
    with pytest.raises(CompareError, match=r"share no book .*same name hold other audio"):
        compare([load_run(a, "a"), load_run(b, "b")], "a", (10,), 2, 10, 100, 0)
    assert main(_args([a, b], tmp_path / "cmp")) == 1
    assert "share no book" in capsys.readouterr().err


def test_books_are_paired_on_their_audio_whatever_their_names(tmp_path):
    books_a = _books(5)
    audio = {k: k for k in books_a}
    renamed = {f"copy_{k}": v - 0.1 for k, v in books_a.items()}
    a = fake_run(tmp_path / "a", books_a, audio, audio_dir="/dataA")
    b = fake_run(tmp_path / "b", renamed, {f"copy_{k}": k for k in books_a}, audio_dir="/dataB")
    result = compare([load_run(a, "a"), load_run(b, "b")], "a", (10, 20), 3, 10, 100, 0)
    assert result["shared_books"] == sorted(books_a) and result["pairing"] == "sha256 of the chapters"
    diff = result["runs"][1]["positions"][0]["paired"]["mean_difference"]
    assert diff == pytest.approx(-0.1, abs=1e-5)


def test_same_audio_with_other_frame_counts_is_refused(tmp_path):
    books = _books(6)
    audio = {k: k for k in books}
    a = fake_run(tmp_path / "a", books, audio)
    b = fake_run(tmp_path / "b", {k: v[:-3] for k, v in books.items()}, audio)
    with pytest.raises(CompareError, match="different frame counts"):
        compare([load_run(a, "a"), load_run(b, "b")], "a", (10,), 2, 10, 100, 0)


def test_other_codec_or_other_audio_folder_without_identity_is_refused(tmp_path):
    books = _books(7)
    audio = {k: k for k in books}
    a = fake_run(tmp_path / "a", books, audio)
    b = fake_run(tmp_path / "b", books, audio, codec="c1")
    with pytest.raises(CompareError, match="different codecs"):
        compare([load_run(a, "a"), load_run(b, "b")], "a", (10,), 2, 10, 100, 0)
    # Book files without chapter identities (older runs): paired by name, only over the same audio folder.
    c = fake_run(tmp_path / "c", books, audio_dir="/dataA")
    d = fake_run(tmp_path / "d", books, audio_dir="/dataB")
    with pytest.raises(CompareError, match="different audio folders"):
        compare([load_run(c, "c"), load_run(d, "d")], "c", (10,), 2, 10, 100, 0)
    e = fake_run(tmp_path / "e", books, audio_dir="/dataA")
    result = compare([load_run(c, "c"), load_run(e, "e")], "c", (10,), 2, 10, 100, 0)
    assert result["pairing"].startswith("sequence id")


# Item 16: a run against itself, folders of the same name, the runs' own report positions.

def test_a_run_against_itself_says_so(tmp_path, capsys):
    books = _books(8)
    a = fake_run(tmp_path / "a", books, {k: k for k in books})
    assert main(_args([a, a], tmp_path / "cmp")) == 0
    captured = capsys.readouterr()
    assert "same run folder" in captured.err and "zero width" in captured.err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["a#1", "a#2"]
    assert any("same run folder" in n for n in result["notes"])
    assert "Note:" in (tmp_path / "cmp" / "compare.md").read_text()
    # A copy with the very same losses: not the same folder, but the same numbers.
    copy = fake_run(tmp_path / "copy", books, {k: k for k in books})
    result = compare([load_run(a, "a"), load_run(copy, "copy")], "a", (10,), 2, 10, 100, 0)
    assert any("identical losses" in n for n in result["notes"])
    other = fake_run(tmp_path / "other", {k: v + 0.01 for k, v in books.items()}, {k: k for k in books})
    result = compare([load_run(a, "a"), load_run(other, "o")], "a", (10,), 2, 10, 100, 0)
    assert result["notes"] == []
    # 4 shared books: the intervals are flagged as not meaningful.
    assert "only 4 book(s)" in result["few_books"]


def test_run_folders_of_the_same_name_get_distinct_names(tmp_path, capsys):
    books = _books(9)
    a = fake_run(tmp_path / "base" / "run", books, {k: k for k in books})
    b = fake_run(tmp_path / "ttt" / "run", {k: v - 0.1 for k, v in books.items()}, {k: k for k in books})
    assert run_names([a, b]) == ["base/run", "ttt/run"]
    assert run_names([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]
    assert main(_args([a, b], tmp_path / "cmp")) == 0
    assert "ttt/run - base/run" in capsys.readouterr().out
    assert main(_args([a, b], tmp_path / "cmp", "--names", "one,one")) == EXIT_USAGE
    assert "--names: expected 2 distinct" in capsys.readouterr().err


def test_without_report_at_the_runs_own_positions_are_used(tmp_path, capsys):
    books = _books(10)
    a = fake_run(tmp_path / "a", books, {k: k for k in books}, report_at=[12, 30], report_window=4)
    b = fake_run(tmp_path / "b", {k: v - 0.1 for k, v in books.items()}, {k: k for k in books},
                 report_at=[12, 30], report_window=4)
    assert main(_args([a, b], tmp_path / "cmp")) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["report_at"] == [12, 30] and result["half_window"] == 4
    assert all(p["window_mean"] is not None for r in result["runs"] for p in r["positions"])
    # Positions no shared book reaches: an error that says how far the books go, not a table of "-".
    capsys.readouterr()
    assert main(_args([a, b], tmp_path / "cmp2", "--report-at", "8000,16000")) == 1
    err = capsys.readouterr().err
    assert "no report position [8000, 16000] is reached" in err and "below" in err


# Item 15: --out naming a file.

def test_compare_out_naming_a_file_is_a_message(tmp_path, capsys):
    books = _books(11)
    a = fake_run(tmp_path / "a", books, {k: k for k in books})
    b = fake_run(tmp_path / "b", books, {k: k for k in books})
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert main(_args([a, b], target)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--out {target} exists and is not a directory" in err and "Traceback" not in err
    assert target.read_text() == "keep me"
