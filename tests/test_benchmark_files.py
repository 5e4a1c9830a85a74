"""moshi_eval.data.benchmarks on official benchmark files that were refused or misread: sWUGGY non-words without
frequency, sBLIMP ids restarting per subtype, strict integers, a BOM, numeric ids, `.WAV`, a gold naming `x.wav`,
several words of one id, StoryCloze at two depths, SALMon parts, FIFOs, files that are not mono 16 kHz.
Small generated wav files, no model."""
import csv
import os
from pathlib import Path
import threading

import numpy as np
import pytest
import sphn

from moshi_eval.config import ConfigError, LikelihoodConfig
from moshi_eval.data.benchmarks import BenchmarkData, load_benchmark
from moshi_eval.data.librilight import DataError
from moshi_eval.tasks.likelihood import ItemScore, aggregate

LEXICAL_HEADER = ["id", "filename", "voice", "frequency", "word", "phones", "length", "correct"]
SYNTACTIC_HEADER = ["id", "filename", "voice", "type", "subtype", "transcription", "correct"]


def wav(path: Path, seconds: float = 0.2, sample_rate: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate), dtype=np.float32) / sample_rate
    data = np.stack([0.1 * np.sin(2 * np.pi * (220 + 30 * c) * t) for c in range(channels)]).astype(np.float32)
    sphn.write_wav(str(path), data if channels > 1 else data[0], sample_rate)
    return path


def gold(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def lexical(root: Path, rows: list[list[str]], make_audio: bool = True, **kw) -> Path:
    """`<root>/lexical/dev/`: the gold rows (LEXICAL_HEADER order) and a wav per filename."""
    folder = root / "lexical" / "dev"
    if make_audio:
        for row in rows:
            wav(folder / f"{row[1]}.wav")
    gold(folder / "gold.csv", LEXICAL_HEADER, rows, **kw)
    return folder


def syntactic(root: Path, rows: list[list[str]]) -> Path:
    folder = root / "syntactic" / "dev"
    for row in rows:
        wav(folder / f"{row[1]}.wav")
    gold(folder / "gold.csv", SYNTACTIC_HEADER, rows)
    return folder


# --- 4. sWUGGY non-words without frequency, word, length ------------------------------------------------------

def test_swuggy_non_words_may_leave_frequency_word_and_length_empty(tmp_path):
    """As the release's gold.csv: the official reads frequency as nullable Int64 and never uses a non-word's
    frequency or length; the pair carries the word's."""
    lexical(tmp_path, [["1", "w1", "v0", "3", "brick", "b r ih k", "4", "1"],
                       ["1", "n1", "v0", "", "", "b l ih k", "", "0"],
                       ["2", "w2", "v0", "120", "stone", "s t ow n", "4", "1"],
                       ["2", "n2", "v0", "", "", "s t ow m", "", "0"]])
    data = load_benchmark("swuggy", tmp_path)
    assert [(p.positive, p.negative, p.unit, p.attributes) for p in data.pairs] == [
        ("w1", "n1", "1", {"frequency": "3", "length": "4"}),
        ("w2", "n2", "2", {"frequency": "120", "length": "4"})]
    assert not data.skipped


def test_swuggy_a_word_still_needs_its_frequency_and_a_non_word_frequency_is_still_an_integer(tmp_path):
    folder = lexical(tmp_path, [["1", "w1", "v0", "", "brick", "b", "4", "1"], ["1", "n1", "v0", "", "", "b", "", "0"]])
    with pytest.raises(DataError, match=r"gold.csv:2: column 'frequency' \(field 4\): expected an integer.*got ''"):
        load_benchmark("swuggy", tmp_path)
    gold(folder / "gold.csv", LEXICAL_HEADER, [["1", "w1", "v0", "3", "brick", "b", "4", "1"],
                                               ["1", "n1", "v0", "x", "", "b", "", "0"]])
    with pytest.raises(DataError, match=r"gold.csv:3: column 'frequency' \(field 4\): expected an integer.*got 'x'"):
        load_benchmark("swuggy", tmp_path)


# --- 5. sBLIMP ids restarting in each subtype ------------------------------------------------------------------

def test_sblimp_ids_that_restart_in_each_subtype_pair_by_type_subtype_id_and_voice(tmp_path):
    rows = []
    for subtype in ("s1", "s2"):
        for i in ("0", "1"):
            for correct in ("1", "0"):
                rows.append([i, f"{subtype}_{i}_{correct}", "v0", "T", subtype, "x", correct])
    syntactic(tmp_path, rows)
    data = load_benchmark("sblimp", tmp_path)
    assert not data.skipped and data.notes == []
    assert sorted((p.attributes["subtype"], p.unit, p.positive, p.negative) for p in data.pairs) == [
        ("s1", "0", "s1_0_1", "s1_0_0"), ("s1", "1", "s1_1_1", "s1_1_0"),
        ("s2", "0", "s2_0_1", "s2_0_0"), ("s2", "1", "s2_1_1", "s2_1_0")]
    # accuracy over the 4 (type, subtype, id) units: positive more likely in 3 of them
    ll = {key: -1.0 if key.endswith("_1") else -2.0 for key in data.files}
    ll["s2_1_1"] = -3.0
    scores = {k: ItemScore(k, 10, 80, v) for k, v in ll.items()}
    acc, left = aggregate(data, scores, resamples=0)
    assert not left
    assert acc["sum"]["overall"]["units"] == 4 and acc["sum"]["overall"]["accuracy"] == pytest.approx(0.75)
    assert acc["sum"]["subtype"]["s1"]["accuracy"] == 1.0 and acc["sum"]["subtype"]["s2"]["accuracy"] == 0.5


# --- 6. integers, BOM, numeric ids, .WAV, names with extension, several words, depth, parts, FIFO, formats ----

@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "3.5", "3.0", "1_0", "x", "- 3"])
def test_integer_columns_are_parsed_strictly_and_errors_name_file_line_and_column(tmp_path, value):
    """`str.isdigit()` let '²' (and '٣') pass, then a traceback later: now refused where it is."""
    lexical(tmp_path, [["1", "w1", "v0", "3", "brick", "b", "4", "1"],
                       ["1", "n1", "v0", "", "", "b", "", "0"],
                       ["2", "w2", "v0", "5", "stone", "s", value, "1"],
                       ["2", "n2", "v0", "", "", "s", "", "0"]])
    with pytest.raises(DataError, match=rf"gold.csv:4: column 'length' \(field 7\): expected an integer "
                                        rf"\(ASCII digits.*\), got '{value}'"):
        load_benchmark("swuggy", tmp_path)


def test_integers_with_surrounding_whitespace_are_accepted_and_normalised(tmp_path):
    lexical(tmp_path, [[" 1", "w1", "v0", " 07 ", "brick", "b", "4 ", " 1 "],
                       ["1 ", "n1", "v0", "", "", "b", "", "0"]])
    data = load_benchmark("swuggy", tmp_path)
    assert [(p.unit, p.attributes) for p in data.pairs] == [("1", {"frequency": "7", "length": "4"})]


def test_correct_must_still_be_0_or_1(tmp_path):
    lexical(tmp_path, [["1", "w1", "v0", "3", "brick", "b", "4", "\u00b9"], ["1", "n1", "v0", "", "", "b", "", "0"]])
    with pytest.raises(DataError, match=r"gold.csv:2: column 'correct' must be 0 or 1, got '\u00b9' \(field 8\)"):
        load_benchmark("swuggy", tmp_path)


def test_gold_with_a_utf8_bom_is_read(tmp_path):
    lexical(tmp_path, [["1", "w1", "v0", "3", "brick", "b", "4", "1"], ["1", "n1", "v0", "", "", "b", "", "0"]],
            encoding="utf-8-sig")
    assert (tmp_path / "lexical" / "dev" / "gold.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert [(p.positive, p.negative) for p in load_benchmark("swuggy", tmp_path).pairs] == [("w1", "n1")]


def test_ids_1_and_01_are_one_unit_when_every_id_is_an_integer(tmp_path):
    """As pandas reads an all-numeric id column as integers; with one non-numeric id, ids are compared as text."""
    folder = lexical(tmp_path, [["1", "w1", "v0", "3", "brick", "b", "4", "1"],
                                ["01", "n1", "v0", "", "", "b", "", "0"]])
    data = load_benchmark("swuggy", tmp_path)
    assert [(p.positive, p.negative, p.unit) for p in data.pairs] == [("w1", "n1", "1")] and not data.skipped
    wav(folder / "wa.wav")
    wav(folder / "na.wav")
    gold(folder / "gold.csv", LEXICAL_HEADER, [["1", "w1", "v0", "3", "brick", "b", "4", "1"],
                                               ["01", "n1", "v0", "", "", "b", "", "0"],
                                               ["a", "wa", "v0", "3", "stone", "s", "4", "1"],
                                               ["a", "na", "v0", "", "", "s", "", "0"]])
    data = load_benchmark("swuggy", tmp_path)
    assert [p.unit for p in data.pairs] == ["a"]
    assert {s["pair"] for s in data.skipped if "pair" in s} == {"id 1, voice v0", "id 01, voice v0"}


def test_upper_case_wav_extension_is_found_for_its_row_with_a_note(tmp_path):
    folder = lexical(tmp_path, [["1", "w1", "v0", "3", "brick", "b", "4", "1"],
                                ["1", "n1", "v0", "", "", "b", "", "0"]], make_audio=False)
    wav(folder / "w1.wav")
    wav(folder / "n1.WAV")
    data = load_benchmark("swuggy", tmp_path)
    assert [(p.positive, p.negative) for p in data.pairs] == [("w1", "n1")] and not data.skipped
    assert data.files["n1"].name == "n1.WAV"
    assert any("n1.WAV" in n and "case-sensitive" in n for n in data.notes)


def test_upper_case_storycloze_and_salmon_files_are_found_too(tmp_path):
    wav(tmp_path / "sc" / "0_a_correct.WAV")
    wav(tmp_path / "sc" / "0_a_incorrect.wav")
    data = load_benchmark("sstorycloze", tmp_path / "sc")
    assert [(p.positive, p.negative) for p in data.pairs] == [("0_a_correct", "0_a_incorrect")]
    assert any("case-sensitive" in n for n in data.notes)
    wav(tmp_path / "sal" / "rir_consistency" / "sample_0_0.wav")
    wav(tmp_path / "sal" / "rir_consistency" / "sample_0_1.Wav")
    data = load_benchmark("salmon", tmp_path / "sal", parts=["rir_consistency"])
    assert [(p.positive, p.negative) for p in data.pairs] == [("rir_consistency/sample_0_0",
                                                               "rir_consistency/sample_0_1")]


def test_gold_naming_files_with_their_extension_is_accepted_with_a_note(tmp_path):
    folder = lexical(tmp_path, [["1", "w1.wav", "v0", "3", "brick", "b", "4", "1"],
                                ["1", "n1.WAV", "v0", "", "", "b", "", "0"]], make_audio=False)
    wav(folder / "w1.wav")
    wav(folder / "n1.wav")
    data = load_benchmark("swuggy", tmp_path)
    assert [(p.positive, p.negative) for p in data.pairs] == [("w1", "n1")] and not data.skipped
    assert any("extension" in n and "'w1.wav'" in n for n in data.notes)


def test_an_id_with_two_words_and_one_non_word_makes_two_pairs_and_a_note(tmp_path):
    lexical(tmp_path, [["3", "w3a", "v0", "3", "brick", "b", "4", "1"],
                       ["3", "w3b", "v0", "3", "brick", "b", "4", "1"],
                       ["3", "n3", "v0", "", "", "b", "", "0"],
                       ["4", "w4", "v0", "3", "stone", "s", "4", "1"],
                       ["4", "n4", "v0", "", "", "s", "", "0"]])
    data = load_benchmark("swuggy", tmp_path)
    assert [(p.positive, p.negative) for p in data.pairs] == [("w3a", "n3"), ("w3b", "n3"), ("w4", "n4")]
    notes = [n for n in data.notes if "2 words x 1 non-word" in n]
    assert len(notes) == 1 and "id 3, voice v0" in notes[0] and "id 4" not in notes[0]


def test_storycloze_files_at_two_depths_are_refused_naming_the_folder(tmp_path):
    wav(tmp_path / "0_a_correct.wav")
    wav(tmp_path / "0_a_incorrect.wav")
    wav(tmp_path / "deeper" / "1_b_correct.wav")
    wav(tmp_path / "deeper" / "1_b_incorrect.wav")
    with pytest.raises(DataError, match=r"both directly in .* and one folder deeper, in deeper/ \(2\)"):
        load_benchmark("sstorycloze", tmp_path)
    (tmp_path / "0_a_correct.wav").unlink()
    (tmp_path / "0_a_incorrect.wav").unlink()
    assert [p.unit for p in load_benchmark("sstorycloze", tmp_path).pairs] == ["deeper/1_b"]


@pytest.mark.parametrize("parts", [("a", "a"), ("speaker_consistency", "speaker_consistency"), (), ("", "")])
def test_salmon_parts_doubled_or_empty_are_config_errors(tmp_path, parts):
    with pytest.raises(ConfigError, match="parts"):
        LikelihoodConfig(task="salmon", data=tmp_path, parts=parts).validate()


@pytest.mark.parametrize("parts, expected", [(["rir_consistency", "rir_consistency/"], "twice"),
                                             (["", ""], "empty part name"), ([], "no part")])
def test_load_salmon_refuses_doubled_or_empty_parts(tmp_path, parts, expected):
    """Without the config's check (the library call): a part listed twice would count twice, '' reads the root."""
    for s in range(2):
        for i in range(2):
            wav(tmp_path / "rir_consistency" / f"sample_{s}_{i}.wav")
    wav(tmp_path / "sample_9_0.wav")
    wav(tmp_path / "sample_9_1.wav")
    with pytest.raises(DataError, match=expected):
        load_benchmark("salmon", tmp_path, parts=parts)


def _load_in_thread(*args, **kwargs):
    """load_benchmark, failing the test rather than hanging it if it opens a FIFO."""
    out: dict = {}

    def target():
        try:
            out["data"] = load_benchmark(*args, **kwargs)
        except Exception as exc:       # noqa: BLE001 - handed to the test
            out["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "load_benchmark blocked (it opened the FIFO)"
    if "error" in out:
        raise out["error"]
    return out["data"]


def test_a_fifo_named_like_a_listed_wav_is_skipped_without_being_opened(tmp_path):
    from moshi_eval.tasks.likelihood import _batches
    for s in range(2):
        for kind in ("correct", "incorrect"):
            wav(tmp_path / f"{s}_u{s}_{kind}.wav")
    fifo = tmp_path / "1_u1_incorrect.wav"
    fifo.unlink()
    os.mkfifo(fifo)
    data = _load_in_thread("sstorycloze", tmp_path)
    assert "1_u1_incorrect" not in data.files
    assert [p.unit for p in data.pairs] == ["0_u0"]
    reasons = {s.get("file") or s.get("pair"): s["reason"] for s in data.skipped}
    assert "FIFO" in reasons["1_u1_incorrect"] and "not read" in reasons["1_u1_incorrect"]
    batches, _ = _batches(data, 4)                    # the headers of the files kept: no FIFO among them
    assert sorted(k for b in batches for k in b) == ["0_u0_correct", "0_u0_incorrect"]
    with pytest.raises(DataError, match=r"1_u1_incorrect.*FIFO"):
        _load_in_thread("sstorycloze", tmp_path, strict=True)


def test_a_fifo_in_a_zerospeech_folder_is_skipped_with_its_reason(tmp_path):
    folder = lexical(tmp_path, [["1", "w1", "v0", "3", "brick", "b", "4", "1"],
                                ["1", "n1", "v0", "", "", "b", "", "0"],
                                ["2", "w2", "v0", "3", "stone", "s", "4", "1"],
                                ["2", "n2", "v0", "", "", "s", "", "0"]])
    (folder / "n2.wav").unlink()
    os.mkfifo(folder / "n2.wav")
    data = _load_in_thread("swuggy", tmp_path)
    assert "n2" not in data.files and [p.unit for p in data.pairs] == ["1"]
    reasons = {s.get("file") or s.get("pair"): s["reason"] for s in data.skipped}
    assert "FIFO" in reasons["n2"] and "unpaired" in reasons["id 2, voice v0"]


def test_files_not_mono_16k_are_counted_in_a_note(tmp_path):
    wav(tmp_path / "0_a_correct.wav")
    wav(tmp_path / "0_a_incorrect.wav")
    assert load_benchmark("sstorycloze", tmp_path).notes == []
    wav(tmp_path / "1_b_correct.wav", sample_rate=44100, channels=2)
    wav(tmp_path / "1_b_incorrect.wav", sample_rate=16000, channels=2)
    notes = [n for n in load_benchmark("sstorycloze", tmp_path).notes if "mono 16 kHz" in n]
    assert len(notes) == 1
    assert "2 of 4 file(s) are not mono 16 kHz" in notes[0]
    assert "1_b_correct (2 channels, 44100 Hz)" in notes[0] and "down-mixed" in notes[0]


def test_limit_keeps_the_notes(tmp_path):
    wav(tmp_path / "0_a_correct.wav", sample_rate=24000)
    wav(tmp_path / "0_a_incorrect.wav")
    wav(tmp_path / "1_b_correct.wav")
    wav(tmp_path / "1_b_incorrect.wav")
    data = load_benchmark("sstorycloze", tmp_path)
    assert data.notes and data.limit(1).notes == data.notes
    nogold = BenchmarkData("swuggy", tmp_path, dict(data.files), [], [], has_gold=False, notes=["n"])
    assert nogold.limit(1).notes == ["n"]
