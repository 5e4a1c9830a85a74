"""moshi_eval.tasks.likelihood: per-file log-likelihoods against LMModel.forward, official aggregation by hand, layouts,
bad input. Tiny seeded models, generated audio, no network."""
import csv
import json
from pathlib import Path
import re

import numpy as np
import pytest
import sphn
import torch
import torch.nn.functional as F
from moshi.models import loaders
from moshi.utils.compile import no_compile

from helpers.checkpoint_factory import make_tiny_mimi, synthetic_speechlike, tiny_lm_config
from moshi_eval.data.benchmarks import Pair, load_benchmark
from moshi_eval.data.codes import encode_audio, silence_codes
from moshi_eval.data.librilight import DataError, read_audio
from moshi_eval.tasks.likelihood import (ItemScore, LikelihoodConfig, aggregate, evaluate_likelihood, flat_metrics,
                                         frequency_band)

SR = 16000


# --- data in the official layouts ------------------------------------------------------------------------------

def write_wav(path: Path, seconds: float, seed: int, sample_rate: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(path), synthetic_speechlike(seconds, sample_rate, seed), sample_rate)
    return path


LEXICAL_HEADER = ["id", "filename", "voice", "frequency", "word", "phones", "length", "correct"]
SYNTACTIC_HEADER = ["id", "filename", "voice", "type", "subtype", "transcription", "correct"]


def make_zerospeech(root: Path, part: str = "lexical", split: str = "dev", ids: int = 3, voices: int = 2,
                    seed: int = 0) -> list[dict]:
    """`<root>/<part>/<split>/*.wav` (16 kHz) + gold.csv as the ZeroSpeech 2021 release. Returns the rows."""
    folder = root / part / split
    rows = []
    n = 0
    for i in range(ids):
        for v in range(voices):
            for correct in (1, 0):
                name = f"f{i}{v}{correct}x{seed}"
                write_wav(folder / f"{name}.wav", 0.4 + 0.15 * ((n * 7) % 5), seed * 100 + n)
                n += 1
                if part == "lexical":
                    rows.append({"id": str(i), "filename": name, "voice": f"v{v}", "frequency": str([0, 3, 50][i % 3]),
                                 "word": f"w{i}" if correct else "", "phones": "a b", "length": str(4 + i % 2),
                                 "correct": str(correct)})
                else:
                    rows.append({"id": str(i), "filename": name, "voice": f"v{v}", "type": f"t{i % 2}",
                                 "subtype": f"s{i}", "transcription": "x", "correct": str(correct)})
    if split == "dev":
        write_gold(folder / "gold.csv", rows, LEXICAL_HEADER if part == "lexical" else SYNTACTIC_HEADER)
    return rows


def write_gold(path: Path, rows: list[dict], header: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def make_storycloze(root: Path, stories: int = 3) -> Path:
    for s in range(stories):
        for kind in ("correct", "incorrect"):
            write_wav(root / f"{s}_uuid{s}ab_{kind}.wav", 0.5 + 0.2 * s + (0.1 if kind == "correct" else 0), 50 + 2 * s
                      + (kind == "correct"))
    return root


def make_salmon(root: Path, parts=("speaker_consistency", "bg_alignment"), samples: int = 2) -> Path:
    for p, part in enumerate(parts):
        for s in range(samples):
            for i in range(2):
                write_wav(root / part / f"sample_{s}_{i}.wav", 0.4 + 0.1 * i, 300 + 10 * p + 2 * s + i)
    return root


# --- models ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=tiny_lm_config(card=64, context=12), device="cpu", dtype=torch.float32)
    return lm.eval(), make_tiny_mimi(0, bins=64)


def forward_log_likelihood(lm, mimi, path: Path, text: str, user_stream: str) -> tuple[float, int]:
    """Independent: LMModel.forward on the file's codes (+ max_delay frames of -1 audio), CE summed by hand."""
    codes = encode_audio(mimi, read_audio(path, mimi.sample_rate))[: lm.dep_q]
    T, d = codes.shape[1], max(lm.delays)
    n = T + d
    audio = torch.cat([codes, torch.full((lm.dep_q, d), -1)], dim=1)
    text_value = {"pad": lm.text_padding_token_id, "zero": -1}[text]
    text_row = torch.full((1, n), text_value)
    if user_stream == "silence":
        sil = silence_codes(mimi, 160)[: lm.n_q - lm.dep_q]
        user = sil[:, torch.arange(n).clamp(max=sil.shape[1] - 1)]
    else:
        user = torch.full((lm.n_q - lm.dep_q, n), -1)
    with torch.no_grad(), no_compile():
        out = lm(torch.cat([text_row, audio, user])[None])
    logp = F.log_softmax(out.logits[0, :, :T].double(), dim=-1)          # [K, T, card]
    total = logp.gather(-1, codes[:, :, None]).sum().item()
    return total, T


# --- per-file scores -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,user_stream", [("pad", "silence"), ("zero", "zero")])
def test_log_likelihood_equals_forward_and_ignores_batch_and_chunk(tmp_path, models, text, user_stream):
    lm, mimi = models
    make_zerospeech(tmp_path, "lexical", ids=2, voices=2)
    results = []
    for batch_size, chunk in ((1, 1), (3, 4), (8, 128)):
        config = LikelihoodConfig("swuggy", tmp_path, text=text, user_stream=user_stream, batch_size=batch_size,
                                  chunk=chunk, bootstrap=0, progress=False)
        results.append(evaluate_likelihood(lm, mimi, config))
    first = results[0]
    assert len(first.scores) == 8 and not first.skipped
    for key, s in first.scores.items():
        expected, T = forward_log_likelihood(lm, mimi, tmp_path / "lexical" / "dev" / f"{key}.wav", text, user_stream)
        assert s.frames == T and s.tokens == 8 * T
        np.testing.assert_allclose(s.log_likelihood, expected, rtol=1e-5, atol=2e-3)
        assert s.log_likelihood_per_token == pytest.approx(s.log_likelihood / (8 * T))
        for other in results[1:]:
            np.testing.assert_allclose(other.scores[key].log_likelihood, s.log_likelihood, rtol=1e-5, atol=2e-3)


def test_24k_and_16k_inputs_score_the_same_resampled_audio(tmp_path, models):
    """16 kHz files are resampled exactly to Mimi's 24 kHz: same frame count as the 24 kHz rendering."""
    lm, mimi = models
    root = tmp_path / "sc"
    write_wav(root / "0_a_correct.wav", 1.0, 1, 16000)
    write_wav(root / "0_a_incorrect.wav", 1.0, 2, 24000)
    result = evaluate_likelihood(lm, mimi, LikelihoodConfig("sstorycloze", root, text="zero", bootstrap=0,
                                                            progress=False))
    assert result.scores["0_a_correct"].frames == result.scores["0_a_incorrect"].frames == 13


# --- official aggregation, by hand -----------------------------------------------------------------------------

def _s(key, ll, frames=10):
    return ItemScore(key, frames, 8 * frames, ll)


def test_swuggy_aggregation_by_hand():
    """Pairs of one id averaged over voices, then over ids; bands with the official [0,1,5,20,100) bins."""
    from moshi_eval.data.benchmarks import BenchmarkData
    pairs = [
        Pair("a1w", "a1n", "a", "v1", {"frequency": "3", "length": "4"}),     # 1
        Pair("a2w", "a2n", "a", "v2", {"frequency": "3", "length": "4"}),     # tie: 0.5 -> id a: 0.75
        Pair("b1w", "b1n", "b", "v1", {"frequency": "5", "length": "5"}),     # 0 -> id b: 0 (band 6-20)
        Pair("b2w", "b2n", "b", "v2", {"frequency": "5", "length": "5"}),     # 0
        Pair("c1w", "c1n", "c", "v1", {"frequency": "0", "length": "4"}),     # 1 -> id c: 1 (oov)
    ]
    scores = {k: _s(k, v, f) for k, v, f in [
        ("a1w", -10., 10), ("a1n", -20., 10), ("a2w", -15., 10), ("a2n", -15., 10),
        ("b1w", -30., 30), ("b1n", -20., 10),      # per token: -0.125 vs -0.25 -> 1 under "mean"
        ("b2w", -30., 10), ("b2n", -20., 10),
        ("c1w", -1., 10), ("c1n", -2., 10)]}
    data = BenchmarkData("swuggy", Path("."), {k: Path(k) for k in scores}, pairs, [])
    acc, left = aggregate(data, scores, resamples=200, seed=0)
    assert not left
    s = acc["sum"]
    assert s["overall"]["accuracy"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert s["overall"]["units"] == 3
    assert {k: v["accuracy"] for k, v in s["frequency"].items()} == {"oov": 1.0, "1-5": 0.75, "6-20": 0.0}
    assert {k: v["accuracy"] for k, v in s["length"].items()} == {"4": pytest.approx(0.875), "5": 0.0}
    assert s["in_vocabulary"]["accuracy"] == pytest.approx(0.375)
    assert acc["mean"]["overall"]["accuracy"] == pytest.approx((0.75 + 0.5 + 1) / 3)
    interval = s["overall"]["interval"]
    assert interval["present"] and 0 <= interval["low"] <= s["overall"]["accuracy"] <= interval["high"] <= 1
    metrics = flat_metrics("swuggy", acc)
    assert metrics["swuggy/accuracy"] == pytest.approx(0.5833333)
    assert metrics["swuggy/accuracy/frequency/oov"] == 1.0
    assert metrics["swuggy/accuracy_per_token"] == pytest.approx(0.75)
    assert "swuggy/accuracy/low" in metrics and "swuggy/accuracy/high" in metrics


def test_frequency_bands_are_the_official_bins():
    assert [frequency_band(f) for f in (0, 1, 4, 5, 19, 20, 99, 100, 10**6)] == \
        ["oov", "1-5", "1-5", "6-20", "6-20", "21-100", "21-100", ">100", ">100"]


def test_sblimp_aggregation_by_type_and_subtype_by_hand():
    from moshi_eval.data.benchmarks import BenchmarkData
    pairs = [Pair("p1", "n1", "1", "v1", {"type": "A", "subtype": "x"}),
             Pair("p2", "n2", "1", "v2", {"type": "A", "subtype": "x"}),
             Pair("p3", "n3", "2", "v1", {"type": "A", "subtype": "y"}),
             Pair("p4", "n4", "3", "v1", {"type": "B", "subtype": "z"})]
    ll = {"p1": -1, "n1": -2, "p2": -3, "n2": -2, "p3": -4, "n3": -4, "p4": -1, "n4": -9}
    scores = {k: _s(k, float(v)) for k, v in ll.items()}
    data = BenchmarkData("sblimp", Path("."), {k: Path(k) for k in scores}, pairs, [])
    acc, _ = aggregate(data, scores, resamples=0)
    s = acc["sum"]
    # units: A/x/1 = mean(1, 0) = 0.5; A/y/2 = 0.5 (tie); B/z/3 = 1
    assert s["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert s["type"]["A"]["accuracy"] == pytest.approx(0.5) and s["type"]["B"]["accuracy"] == 1.0
    assert s["subtype"]["x"]["accuracy"] == 0.5 and s["subtype"]["z"]["accuracy"] == 1.0


def test_pairs_with_an_unscored_file_are_left_out_never_counted():
    from moshi_eval.data.benchmarks import BenchmarkData
    pairs = [Pair("p1", "n1", "1"), Pair("p2", "n2", "2")]
    scores = {"p1": _s("p1", -1.), "n1": _s("n1", -2.), "p2": _s("p2", -1.)}
    data = BenchmarkData("sstorycloze", Path("."), {k: Path(k) for k in ("p1", "n1", "p2", "n2")}, pairs, [])
    acc, left = aggregate(data, scores, resamples=0)
    assert acc["sum"]["overall"]["accuracy"] == 1.0 and acc["sum"]["overall"]["units"] == 1
    assert left == [{"pair": "p2 / n2", "reason": "not scored: ['n2']"}]
    empty, _ = aggregate(BenchmarkData("sstorycloze", Path("."), {}, pairs, []), {}, resamples=0)
    assert empty["sum"]["overall"] == {"present": False, "units": 0, "absent_reason": "no pair scored"}
    assert flat_metrics("sstorycloze", empty) == {}


# --- layouts end to end, accuracies from the per-file scores ---------------------------------------------------

def _hand_accuracy(result, normalization="sum"):
    values = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in
              ((result.scores[p.positive].value(normalization), result.scores[p.negative].value(normalization))
               for p in result.data.pairs)]
    return float(np.mean(values))


def test_storycloze_and_salmon_layouts(tmp_path, models):
    lm, mimi = models
    sc = evaluate_likelihood(lm, mimi, LikelihoodConfig("tstorycloze", make_storycloze(tmp_path / "tsc"),
                                                        text="zero", bootstrap=50, progress=False))
    assert [p.unit for p in sc.data.pairs] == ["0_uuid0ab", "1_uuid1ab", "2_uuid2ab"]
    assert sc.metrics["tstorycloze/accuracy"] == pytest.approx(_hand_accuracy(sc))
    assert sc.metrics["tstorycloze/accuracy_per_token"] == pytest.approx(_hand_accuracy(sc, "mean"))
    sal = evaluate_likelihood(lm, mimi, LikelihoodConfig("salmon", make_salmon(tmp_path / "salmon"),
                                                         parts=("speaker_consistency", "bg_alignment"),
                                                         text="zero", bootstrap=0, progress=False))
    assert [(p.positive, p.negative) for p in sal.data.pairs][:2] == [
        ("speaker_consistency/sample_0_0", "speaker_consistency/sample_0_1"),
        ("speaker_consistency/sample_1_0", "speaker_consistency/sample_1_1")]
    for part in ("speaker_consistency", "bg_alignment"):
        pairs = [p for p in sal.data.pairs if p.attributes["part"] == part]
        expected = np.mean([1.0 if sal.scores[p.positive].log_likelihood > sal.scores[p.negative].log_likelihood
                            else 0.0 for p in pairs])
        assert sal.metrics[f"salmon/accuracy/{part}"] == pytest.approx(expected)


def test_write_results_items_and_submission(tmp_path, models):
    lm, mimi = models
    make_zerospeech(tmp_path / "zr", "syntactic", ids=2, voices=1)
    result = evaluate_likelihood(lm, mimi, LikelihoodConfig("sblimp", tmp_path / "zr", text="zero", bootstrap=20,
                                                            progress=False))
    paths = result.write(tmp_path / "out")
    assert [p.name for p in paths] == ["results.json", "items.csv", "pairs.csv", "dev.txt"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "items.csv")))
    submission = tmp_path / "out" / "submission" / "syntactic" / "dev.txt"
    sub = [line.split(" ") for line in submission.read_text().splitlines()]
    assert len(rows) == len(sub) == 4
    assert {r["file"]: float(r["log_likelihood"]) for r in rows} == {name: float(v) for name, v in sub}
    assert {r["file"] for r in rows} == {p.stem for p in (tmp_path / "zr" / "syntactic" / "dev").glob("*.wav")}
    body = json.loads((tmp_path / "out" / "results.json").read_text())
    assert body["conventions"]["primary_normalization"] == "sum" and body["smoke_run"] is False
    assert body["accuracy"]["overall"]["accuracy"] == pytest.approx(_hand_accuracy(result))
    assert body["submission"]["complete"] is True


def test_test_split_has_no_gold_submission_only(tmp_path, models):
    lm, mimi = models
    make_zerospeech(tmp_path, "lexical", split="test", ids=1, voices=1)
    result = evaluate_likelihood(lm, mimi, LikelihoodConfig("swuggy", tmp_path, split="test", text="zero",
                                                            progress=False))
    assert result.metrics == {} and len(result.scores) == 2
    assert "no gold.csv" in result.accuracies["absent_reason"]
    result.write(tmp_path / "out")
    assert len((tmp_path / "out" / "submission" / "lexical" / "test.txt").read_text().splitlines()) == 2


def test_limit_is_a_smoke_run(tmp_path, models):
    lm, mimi = models
    make_zerospeech(tmp_path, "lexical", ids=3, voices=1)
    result = evaluate_likelihood(lm, mimi, LikelihoodConfig("swuggy", tmp_path, text="zero", limit=2, bootstrap=0,
                                                            progress=False))
    assert len(result.data.pairs) == 2 and len(result.scores) == 4
    assert result.to_dict()["smoke_run"] is True


# --- bad input -------------------------------------------------------------------------------------------------

def test_layout_errors_name_expected_and_found(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError, match=r"expected the ZeroSpeech 2021 layout.*lexical/dev.*Found: something"):
        load_benchmark("swuggy", tmp_path)
    with pytest.raises(DataError, match="StoryCloze layout"):
        load_benchmark("sstorycloze", tmp_path)
    with pytest.raises(DataError, match="SALMon layout.*speaker_consistency"):
        load_benchmark("salmon", tmp_path, parts=["speaker_consistency"])
    with pytest.raises(DataError, match="no such folder"):
        load_benchmark("sblimp", tmp_path / "missing")


def test_gold_errors(tmp_path):
    rows = make_zerospeech(tmp_path, "lexical", ids=2, voices=1)
    gold = tmp_path / "lexical" / "dev" / "gold.csv"
    write_gold(gold, rows, ["id", "filename", "voice", "word", "correct"])
    with pytest.raises(DataError, match=r"gold.csv: malformed lexical gold.csv: missing column\(s\) \['frequency', "
                                        r"'length'\]"):
        load_benchmark("swuggy", tmp_path)
    write_gold(gold, rows + rows[:1], LEXICAL_HEADER)
    with pytest.raises(DataError, match=f"gold.csv:{len(rows) + 2}: file '{rows[0]['filename']}' is listed twice"):
        load_benchmark("swuggy", tmp_path)
    bad = [dict(r) for r in rows]
    bad[1]["correct"] = "yes"
    write_gold(gold, bad, LEXICAL_HEADER)
    with pytest.raises(DataError, match="gold.csv:3: column 'correct' must be 0 or 1, got 'yes'"):
        load_benchmark("swuggy", tmp_path)
    gold.unlink()
    with pytest.raises(DataError, match="gold.csv: missing"):
        load_benchmark("swuggy", tmp_path)


def test_gold_rows_without_audio_and_audio_without_row(tmp_path):
    rows = make_zerospeech(tmp_path, "lexical", ids=2, voices=1)
    folder = tmp_path / "lexical" / "dev"
    (folder / f"{rows[0]['filename']}.wav").unlink()
    write_wav(folder / "stray.wav", 0.3, 9)
    data = load_benchmark("swuggy", tmp_path)
    reasons = {(s.get("file") or s.get("pair")): s["reason"] for s in data.skipped}
    assert "no audio file" in reasons[rows[0]["filename"]]
    assert "unpaired: no correct item" in reasons["id 0, voice v0"]
    assert "without a row in gold.csv" in reasons["stray"]
    assert len(data.pairs) == 1 and "stray" in data.files
    with pytest.raises(DataError, match="stray: audio file without a row in gold.csv.*--strict"):
        load_benchmark("swuggy", tmp_path, strict=True)


def test_unreadable_audio_skips_its_pair_and_strict_raises(tmp_path, models):
    lm, mimi = models
    root = make_storycloze(tmp_path / "sc", stories=2)
    (root / "1_uuid1ab_incorrect.wav").write_bytes(b"RIFF not really a wav")
    config = LikelihoodConfig("sstorycloze", root, text="zero", bootstrap=0, progress=False)
    result = evaluate_likelihood(lm, mimi, config)
    reasons = [s["reason"] for s in result.skipped]
    assert any(r.startswith("unreadable audio") for r in reasons)
    assert any("not scored: ['1_uuid1ab_incorrect']" in r for r in reasons)
    assert result.accuracies["sum"]["overall"]["units"] == 1
    config.strict = True
    with pytest.raises(DataError, match="1_uuid1ab_incorrect.wav"):
        evaluate_likelihood(lm, mimi, config)


def test_unpaired_storycloze_and_salmon_groups(tmp_path):
    root = make_storycloze(tmp_path / "sc", stories=2)
    (root / "0_uuid0ab_incorrect.wav").unlink()
    data = load_benchmark("sstorycloze", root)
    assert len(data.pairs) == 1 and "unpaired" in data.skipped[0]["reason"]
    salmon = make_salmon(tmp_path / "salmon", parts=("rir_consistency",), samples=2)
    write_wav(salmon / "rir_consistency" / "sample_1_2.wav", 0.3, 5)
    data = load_benchmark("salmon", salmon, parts=["rir_consistency"])
    assert len(data.pairs) == 1 and "3 file(s)" in data.skipped[0]["reason"]
    with pytest.raises(DataError, match="rir_consistency sample 1: 3 file"):
        load_benchmark("salmon", salmon, parts=["rir_consistency"], strict=True)


def test_sblimp_gold_order_that_the_official_scorer_would_pair_differently_is_noted(tmp_path):
    rows = make_zerospeech(tmp_path, "syntactic", ids=2, voices=1)
    assert load_benchmark("sblimp", tmp_path).notes == []
    gold = tmp_path / "syntactic" / "dev" / "gold.csv"
    write_gold(gold, [rows[0], rows[1], rows[3], rows[2]], SYNTACTIC_HEADER)    # same pairs, other row order
    assert load_benchmark("sblimp", tmp_path).notes == []
    write_gold(gold, [rows[0], rows[3], rows[2], rows[1]], SYNTACTIC_HEADER)    # correct 0, 1; incorrect 1, 0
    notes = load_benchmark("sblimp", tmp_path).notes
    assert len(notes) == 1 and "k-th correct row" in notes[0]


def test_kv_sized_to_the_batch_keeps_the_forward_numbers_and_restores_the_context(tmp_path):
    """A model whose context (200 frames) is far longer than the files: the caches sized to the batch give the
    log-likelihoods of LMModel.forward, and the model's attention context is restored after scoring."""
    from moshi.modules.transformer import StreamingMultiheadAttention
    torch.manual_seed(1)
    lm = loaders.get_moshi_lm(None, lm_kwargs=tiny_lm_config(card=64, context=200), device="cpu",
                              dtype=torch.float32).eval()
    mimi = make_tiny_mimi(0, bins=64)
    root = make_storycloze(tmp_path / "sc", stories=2)
    result = evaluate_likelihood(lm, mimi, LikelihoodConfig("sstorycloze", root, text="pad", bootstrap=0,
                                                            batch_size=4, progress=False))
    for key, s in result.scores.items():
        expected, _ = forward_log_likelihood(lm, mimi, root / f"{key}.wav", "pad", "silence")
        np.testing.assert_allclose(s.log_likelihood, expected, rtol=1e-5, atol=2e-3)
    contexts = {m.context for m in lm.transformer.modules() if isinstance(m, StreamingMultiheadAttention)}
    assert contexts == {200}


@pytest.mark.parametrize("field, value, expected", [
    ("split", "train", "one of ('dev', 'test')"),        # used to pass, then fail late or not at all
    ("limit", True, "a positive integer or None"),       # a bool is no count of pairs
    ("batch_size", 0, "a positive integer"),
])
def test_bad_config_values_name_the_field(tmp_path, field, value, expected):
    from moshi_eval.tasks.likelihood import LikelihoodConfigError
    with pytest.raises(LikelihoodConfigError, match=rf"^{field} \(--{field.replace('_', '-')}\): "
                                                    rf"expected {re.escape(expected)}, got {value!r}"):
        LikelihoodConfig("sblimp", tmp_path, **{field: value}).check()
