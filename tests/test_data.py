"""moshi_eval.data.librilight: LibriLight discovery, selection, audio reading and resampling."""
import json
from pathlib import Path
import wave

import numpy as np
import pytest

from helpers.checkpoint_factory import write_flac, write_librilight_folder
from moshi_eval.data.librilight import (AudioReadError, Book, DataError, book_seconds, discover_books, natural_key,
                                        read_audio, resample, select_books)


def _touch_flac(path: Path, seconds: float = 0.1, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    return write_flac(path, 0.1 * np.sin(2 * np.pi * 220 * t), rate)


def _write_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    """16-bit WAV via the standard library; `pcm` `[S]` or `[S, C]`."""
    pcm = pcm if pcm.ndim == 2 else pcm[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).round().astype("<i2").tobytes())
    return path


def test_natural_key_orders_numbers_numerically():
    names = ["ch10", "ch2", "ch1", "Ch3", "intro", "ch2b"]
    assert sorted(names, key=natural_key) == ["ch1", "ch2", "ch2b", "Ch3", "ch10", "intro"]


def test_discovery_order_metadata_and_skips(tmp_path):
    for speaker, book, chapters in [("10", "b", ["c10", "c2", "c1"]), ("2", "z", ["x"]),
                                    ("2", "a", ["one.FLAC"])]:
        for name in chapters:
            stem = name.split(".")[0]
            _touch_flac(tmp_path / speaker / book / f"{stem}.flac")
    (tmp_path / "10" / "b" / "c2.json").write_text(json.dumps({"title": "T", "n": 2}))
    (tmp_path / "10" / "b" / "notes.txt").write_text("not audio")
    (tmp_path / "10" / "b" / ".hidden.flac").write_bytes(b"junk")
    (tmp_path / "10" / "empty_book").mkdir()
    (tmp_path / ".cache" / "x").mkdir(parents=True)
    books = discover_books(tmp_path)
    assert [(b.speaker, b.book) for b in books] == [("2", "a"), ("2", "z"), ("10", "b")]
    chapters = books[2].chapters
    assert [c.path.name for c in chapters] == ["c1.flac", "c2.flac", "c10.flac"]
    assert [c.metadata for c in chapters] == [None, {"title": "T", "n": 2}, None]
    assert books[2].sequence_id == "10__b"


def test_discovery_all_extensions(tmp_path):
    folder = tmp_path / "s" / "b"
    folder.mkdir(parents=True)
    for i, ext in enumerate([".flac", ".mp3", ".wav", ".ogg", ".txt"]):
        (folder / f"ch{i}{ext}").write_bytes(b"x")
    books = discover_books(tmp_path)
    assert [c.path.suffix for c in books[0].chapters] == [".flac", ".mp3", ".wav", ".ogg"]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "flat", "no_audio"])
def test_discovery_bad_dirs(tmp_path, case):
    root = tmp_path / "root"
    if case == "file":
        root.write_text("x")
    elif case in ("empty", "flat", "no_audio"):
        root.mkdir()
        if case == "flat":
            _touch_flac(root / "chapter.flac")
        if case == "no_audio":
            (root / "s" / "b").mkdir(parents=True)
            (root / "s" / "b" / "readme.txt").write_text("x")
    expected = {"missing": "does not exist", "file": "not a directory", "empty": "is empty",
                "flat": "<speaker>/<book>/ subfolders", "no_audio": "no audio files"}[case]
    with pytest.raises(DataError, match=expected) as info:
        discover_books(root)
    assert str(root) in str(info.value)


def test_corrupt_metadata_names_the_file(tmp_path):
    _touch_flac(tmp_path / "s" / "b" / "c1.flac")
    bad = tmp_path / "s" / "b" / "c1.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="corrupt metadata") as info:
        discover_books(tmp_path)
    assert str(bad) in str(info.value)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        discover_books(tmp_path)


def test_select_books(tmp_path):
    root = write_librilight_folder(tmp_path, books=3, chapters=3, seconds=0.05)
    books = discover_books(root)
    chosen = select_books(books, num_books=2, max_chapters=2)
    assert [b.book for b in chosen] == ["book0", "book1"]
    assert [[c.path.name for c in b.chapters] for b in chosen] == [["ch1.flac", "ch2.flac"]] * 2
    assert len(books[0].chapters) == 3  # the input is not modified
    assert [len(b.chapters) for b in select_books(books)] == [3, 3, 3]
    for bad in [0, -1, 1.5, True]:
        with pytest.raises(ValueError, match="num_books"):
            select_books(books, num_books=bad)
        with pytest.raises(ValueError, match="max_chapters"):
            select_books(books, max_chapters=bad)


def test_select_books_min_seconds(tmp_path):
    # Book totals: 0.3 s, 1.2 s, 0.9 s (first 2 chapters: 0.2, 0.8, 0.9 s).
    root = write_librilight_folder(tmp_path, books=3, chapters=3,
                                   seconds=[0.1, 0.1, 0.1, 0.4, 0.4, 0.4, 0.45, 0.45, 0.0625])
    books = discover_books(root)
    assert [round(book_seconds(b), 4) for b in books] == [0.3, 1.2, 0.9625]
    assert [b.book for b in select_books(books, min_seconds=0.5)] == ["book1", "book2"]
    assert [b.book for b in select_books(books, num_books=1, min_seconds=0.5)] == ["book1"]
    assert [b.book for b in select_books(books, max_chapters=2, min_seconds=0.85)] == ["book2"]
    assert select_books(books, min_seconds=5.0) == []
    with pytest.raises(ValueError, match="min_seconds"):
        select_books(books, min_seconds=-1)
    books[0].chapters[0].path.write_bytes(b"junk")
    with pytest.raises(AudioReadError) as info:
        select_books(books, min_seconds=0.5)
    assert info.value.path == books[0].chapters[0].path


def test_sequence_id_sanitized_and_unique():
    a = Book("spk 1", "a/b", []).sequence_id
    b = Book("spk_1", "a_b", []).sequence_id
    assert a != b and b == "spk_1__a_b"
    assert all(ch.isalnum() or ch in "._-" for ch in a)


@pytest.mark.parametrize("src,dst", [(16000, 24000), (22050, 24000), (48000, 24000), (44100, 16000),
                                     (22051, 24000), (191999, 24000), (8001, 24000)])
def test_resample_matches_analytic_sine(src, dst):
    n = src // 2 + 37
    tone = 440.0
    wav = (0.5 * np.sin(2 * np.pi * tone * np.arange(n) / src)).astype(np.float32)
    out = resample(wav, src, dst)
    expected_len = -(-n * dst // src)
    assert out.shape == (expected_len,) and out.dtype == np.float32
    reference = 0.5 * np.sin(2 * np.pi * tone * np.arange(expected_len) / dst)
    interior = slice(dst // 100, expected_len - dst // 100)  # edges see the zero padding
    np.testing.assert_allclose(out[interior], reference[interior], atol=1e-4)


@pytest.mark.parametrize("src", [16000, 22050, 44100, 11025, 32000])
def test_resample_direct_path_equals_the_polyphase_filter(src):
    """The per-sample path (awkward rates) applies the very filter of the polyphase path (common rates)."""
    from moshi_eval.data.librilight import _resample_direct, _resample_plan
    up, down, width, method = _resample_plan(src, 24000)
    assert method == "polyphase"
    wav = np.random.default_rng(src).standard_normal(src // 3 + 11).astype(np.float32)
    np.testing.assert_allclose(_resample_direct(wav, up, down, width), resample(wav, src, 24000), atol=1e-5)


@pytest.mark.slow
def test_resample_awkward_rate_in_bounded_memory(tmp_path):
    """5 s at 22,051 Hz built 2 GB filter banks (4.2 GB arrays, 13 GB peak). Run it in a
    process whose address space is capped at 1.5 GB above what torch's import maps."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import resource
        import numpy as np
        import torch
        from moshi_eval.data.librilight import resample
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 29), resource.RLIM_INFINITY))
        for src in (22051, 44101, 96001):
            out = resample(np.ones(5 * src, dtype=np.float32), src, 24000)
            assert out.shape == (-(-5 * src * 24000 // src),)
            assert abs(float(out[24000]) - 1.0) < 1e-3, out[24000]
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_resample_has_no_delay():
    x = np.zeros(16000, dtype=np.float32)
    x[8000] = 1.0  # at t = 0.5 s
    y = resample(x, 16000, 24000)
    assert int(np.argmax(y)) == 12000


def test_read_audio_flac_16k_to_24k(tmp_path):
    n = 16000 + 123
    pcm = 0.4 * np.sin(2 * np.pi * 300 * np.arange(n) / 16000)
    path = write_flac(tmp_path / "a.flac", pcm, 16000)
    out = read_audio(path, 24000)
    assert out.shape == (-(-n * 3 // 2),) and out.dtype == np.float32
    reference = 0.4 * np.sin(2 * np.pi * 300 * np.arange(out.shape[0]) / 24000)
    np.testing.assert_allclose(out[300:-300], reference[300:-300], atol=2e-4)
    # At the native rate it is the decoded 16-bit PCM.
    native = read_audio(path, 16000)
    np.testing.assert_allclose(native, np.round(pcm * 32767) / 32768, atol=1.5 / 32768)


def test_read_audio_stereo_is_averaged(tmp_path):
    n = 2400
    left = 0.5 * np.sin(np.arange(n) * 0.05)
    right = 0.2 * np.cos(np.arange(n) * 0.03)
    path = _write_wav(tmp_path / "st.wav", np.stack([left, right], 1), 24000)
    out = read_audio(path, 24000)
    q = lambda v: np.round(v * 32767) / 32768  # noqa: E731 (16-bit quantization)
    np.testing.assert_allclose(out, (q(left) + q(right)) / 2, atol=1e-6)


def test_read_audio_ogg_opus(tmp_path):
    """Ogg Opus goes through sphn.read_opus, the header's pre-skip dropped (sample alignment checked by hand
    against opusenc/opusdec: sphn.write_opus records a pre-skip of 3840 while priming 312 samples, so
    files it writes cannot check the alignment here)."""
    import sphn
    tone = (0.3 * np.sin(2 * np.pi * 200 * np.arange(96000) / 48000)).astype(np.float32)
    path = tmp_path / "tone.ogg"
    sphn.write_opus(str(path), tone, 48000)
    raw, rate = sphn.read_opus(str(path))
    pre_skip = int.from_bytes(path.read_bytes()[38:40], "little")  # OpusHead at 28, pre-skip at +10
    out = read_audio(path, 48000)
    assert rate == 48000 and out.shape == (raw.shape[-1] - pre_skip,)
    at24 = read_audio(path, 24000)
    assert at24.shape == (-(-out.shape[0] // 2),)
    # Lossy codec: best correlation with the tone over a period of lags, not sample equality.
    seg = out[4800:-4800]
    best = max(np.corrcoef(seg, tone[4800 + lag: 4800 + lag + len(seg)])[0, 1] for lag in range(-240, 240))
    assert best > 0.95


@pytest.mark.parametrize("kind", ["garbage", "truncated_header", "missing", "no_samples", "truncated",
                                  "damaged_frame"])
def test_read_audio_errors_name_the_file(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.flac"
    if kind == "garbage":
        path.write_bytes(b"this is not audio" * 50)
    elif kind == "truncated_header":
        good = write_flac(tmp_path / "good.flac", np.zeros(100), 16000).read_bytes()
        path.write_bytes(good[:20])
    elif kind in ("truncated", "damaged_frame"):
        good = write_flac(tmp_path / "good.flac", 0.1 * np.ones(16000 * 3), 16000)
        assert len(read_audio(good, 16000)) == 16000 * 3
        data = bytearray(good.read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:  # sphn skips a frame whose CRC fails, silently
            data[len(data) // 2: len(data) // 2 + 20] = bytes(20)
        path.write_bytes(bytes(data))
    elif kind == "no_samples":
        path = _write_wav(tmp_path / "empty.wav", np.zeros((0, 1)), 16000)
    with pytest.raises(AudioReadError) as info:
        read_audio(path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    assert isinstance(info.value, DataError)


def test_nothing_is_dropped_or_doubled_silently(tmp_path, caplog):
    """Audio at the wrong depth was ignored, `c1.flac` + `c1.wav` counted twice, a linked
    speaker folder counted its books twice, all without a word."""
    import logging
    root = tmp_path / "root"
    _touch_flac(root / "s1" / "b1" / "c1.flac")
    _write_wav(root / "s1" / "b1" / "c1.wav", np.zeros(1600), 16000)           # the same chapter, as WAV
    _touch_flac(root / "s1" / "b1" / "c2.flac")
    _touch_flac(root / "s1" / "b1" / "extra" / "c3.flac")                      # a sub-folder of a book
    _touch_flac(root / "s1" / "loose.flac")                                    # in a speaker folder
    _touch_flac(root / "stray.flac")                                           # in the root
    (root / "s2").symlink_to(root / "s1", target_is_directory=True)            # a linked speaker folder
    with caplog.at_level(logging.WARNING, logger="moshi_eval.data.librilight"):
        books = discover_books(root)
    assert [(b.speaker, b.book) for b in books] == [("s1", "b1")]
    assert [c.path.name for c in books[0].chapters] == ["c1.flac", "c2.flac"]
    text = caplog.text
    for named in ("c1.wav", "extra", "loose.flac", "stray.flac", str(root / "s2" / "b1")):
        assert named in text, (named, text)


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_a_chapter_that_is_not_a_regular_file_is_rejected_without_reading_it(tmp_path, kind):
    """A link to /dev/zero was hashed forever, a FIFO blocked in sphn.durations."""
    import os
    from moshi_eval.files.hashing import FileHasher
    book_dir = tmp_path / "s" / "b"
    _touch_flac(book_dir / "c1.flac")
    bad = book_dir / "c2.flac"
    if kind == "dev_zero":
        bad.symlink_to("/dev/zero")
    else:
        os.mkfifo(bad)
    (book,) = discover_books(tmp_path)
    assert [c.path.name for c in book.chapters] == ["c1.flac", "c2.flac"]       # kept: skipped with the reason
    with pytest.raises(AudioReadError, match="not a regular file") as info:
        book_seconds(book)
    assert info.value.path == bad
    with pytest.raises(AudioReadError, match="FIFO" if kind == "fifo" else "character device"):
        read_audio(bad)
    with pytest.raises(OSError, match="not a regular file"):
        FileHasher().identity(bad)
