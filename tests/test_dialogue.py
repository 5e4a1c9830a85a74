"""moshi_eval.tasks.dialogue and moshi_eval.data.dialogues: text and audio cross-entropy, plain and moshi-finetune
weighted, against LMModel.forward's logits and masks with the weighting written out here; TTT streaming state; every
call scoring every batch; the reader of moshi-finetune's layout (windows, text frames, the text length quirk, bad
input named); files, resume and the runner. Tiny seeded models, generated audio, CPU."""
import json
import math
from pathlib import Path
import re

import numpy as np
import pytest
import sphn
import torch
import torch.nn.functional as F
from moshi.utils.compile import no_compile

from helpers.checkpoint_factory import make_tiny_mimi, synthetic_speechlike, write_tokenizer
from helpers.lm_factory import make_lm, random_codes, ttt_lm
from moshi_eval import distributed
from moshi_eval.checkpoint import LoadedCheckpoint
from moshi_eval.config import ConfigError
from moshi_eval.data.codes import encode_audio
from moshi_eval.data.dialogues import (DialogueBatches, build_text_stream, load_dialogues, plan_windows,
                                       read_manifest)
from moshi_eval.data.librilight import AudioReadError, DataError, read_audio
from moshi_eval.demo import ASSETS_DIR, demo_lm, demo_mimi
from moshi_eval.files.folder import RunFolder
from moshi_eval.tasks.base import Evaluators
from moshi_eval.tasks.dialogue import DialogueConfig, DialogueEvaluator, DialogueTask
from moshi_eval.tasks.runner import TaskRun, run_task

PAD, EOP = 3, 0      # moshi-finetune's text padding and end-of-padding ids (Moshi's; make_lm's too)


# --- the reference: LMModel.forward, CE and weights by hand -------------------------------------------------------

def by_hand(lm, batches, text_padding_weight=1.0, first_codebook_weight=1.0) -> dict:
    """Whole-set sums from `LMModel.forward`'s logits and masks: moshi-finetune's compute_loss_with_mask written out
    (w = mask; text: w *= text_padding_weight where target is PAD or EOP; audio: w[:, 0] *= first_codebook_weight;
    sum(ce * w) / sum(w)), but summed over every batch before dividing."""
    s = {k: 0.0 for k in ("t", "tn", "tw", "twn", "a", "an", "aw", "awn", "hit", "nonpad")}
    K = lm.dep_q
    s["cb"], s["cbn"] = np.zeros(K), np.zeros(K)
    s["batch_loss"] = []      # moshi-finetune's eval: each batch's text + audio weighted loss, then their mean
    frames = max(b.shape[-1] for b in batches)
    s["curve_t"], s["curve_tn"] = np.zeros(frames), np.zeros(frames)
    with torch.no_grad(), no_compile():
        for codes in batches:
            out = lm(codes)
            target, mask = codes[:, :1], out.text_mask
            ce = F.cross_entropy(out.text_logits.double().flatten(0, 2), target.clamp(min=0).flatten(),
                                 reduction="none").view(target.shape)
            ce = torch.where(mask, ce, 0.0)
            w = mask.double()
            padding = (target == PAD) | (target == EOP)
            w[padding] *= text_padding_weight
            batch_loss = float((ce * w).sum() / w.sum())
            s["t"] += float(ce.sum())
            s["tn"] += int(mask.sum())
            s["tw"] += float((ce * w).sum())
            s["twn"] += float(w.sum())
            s["hit"] += int(((out.text_logits.argmax(-1) == target) & mask & ~padding).sum())
            s["nonpad"] += int((mask & ~padding).sum())
            s["curve_t"][:codes.shape[-1]] += ce[:, 0].sum(0).numpy()
            s["curve_tn"][:codes.shape[-1]] += mask[:, 0].sum(0).numpy()
            target, mask = codes[:, 1:1 + K], out.mask
            ce = F.cross_entropy(out.logits.double().flatten(0, 2), target.clamp(min=0).flatten(),
                                 reduction="none").view(target.shape)
            ce = torch.where(mask, ce, 0.0)     # forward's logits are NaN at masked positions
            w = mask.double()
            w[:, 0] *= first_codebook_weight
            s["batch_loss"].append(batch_loss + float((ce * w).sum() / w.sum()))
            s["a"] += float(ce.sum())
            s["an"] += int(mask.sum())
            s["aw"] += float((ce * w).sum())
            s["awn"] += float(w.sum())
            s["cb"] += ce.sum((0, 2)).numpy()
            s["cbn"] += mask.sum((0, 2)).numpy()
    return s


def assert_matches(metrics: dict, ref: dict, K: int, rtol: float = 1e-5) -> None:
    expected = {
        "dialogue/text_ce": ref["t"] / ref["tn"], "dialogue/audio_ce": ref["a"] / ref["an"],
        "dialogue/text_ce_weighted": ref["tw"] / ref["twn"], "dialogue/audio_ce_weighted": ref["aw"] / ref["awn"],
        "dialogue/loss": ref["tw"] / ref["twn"] + ref["aw"] / ref["awn"],
        "dialogue/text_perplexity": math.exp(ref["t"] / ref["tn"]),
        "dialogue/audio_perplexity": math.exp(ref["a"] / ref["an"]),
        **{f"dialogue/codebook_{k}_ce": ref["cb"][k] / ref["cbn"][k] for k in range(K)},
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=rtol), name
    assert metrics["dialogue/text_tokens"] == ref["tn"] and metrics["dialogue/audio_tokens"] == ref["an"]
    assert metrics["dialogue/batch_mean_loss"] == pytest.approx(np.mean(ref["batch_loss"]), rel=rtol)
    # An argmax could only flip at an exact near-tie of two logits (float rounding): none in these seeds.
    assert metrics["dialogue/text_accuracy"] == ref["hit"] / ref["nonpad"]


def padded_random(lm, batch: int, frames: int, seed: int, text_lengths, audio_lengths, user_lengths=None):
    """Random codes `[B, 1 + n_q, T]` with each stream cut to its item's length (-1 after), PAD / EOP sprinkled in the
    text (both weighted targets occur)."""
    codes = random_codes(lm, batch, frames, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    text = codes[:, 0]
    text[torch.rand(text.shape, generator=gen) < 0.3] = PAD
    text[torch.rand(text.shape, generator=gen) < 0.1] = EOP
    for b in range(batch):
        codes[b, 0, text_lengths[b]:] = -1
        codes[b, 1:1 + lm.dep_q, audio_lengths[b]:] = -1
        codes[b, 1 + lm.dep_q:, (user_lengths or audio_lengths)[b]:] = -1
    return codes


@pytest.fixture(scope="module")
def lm():
    return make_lm(seed=0)


@pytest.fixture(scope="module")
def random_batches(lm):
    """Batches of different sizes and widths; items of different lengths per stream: text longer than the audio
    (the text length quirk), shorter, an item with no target (all -1), a batch whose text outlasts every audio."""
    return [
        padded_random(lm, 3, 20, 1, text_lengths=[20, 14, 9], audio_lengths=[20, 10, 12]),
        padded_random(lm, 1, 7, 2, text_lengths=[7], audio_lengths=[7]),
        padded_random(lm, 2, 33, 3, text_lengths=[33, 25], audio_lengths=[18, 25], user_lengths=[33, 5]),
        padded_random(lm, 2, 12, 4, text_lengths=[12, 0], audio_lengths=[5, 0]),     # text past every audio
    ]


def test_random_codes_equal_forward_plain_and_weighted(lm, random_batches):
    evaluator = DialogueEvaluator(random_batches, text_padding_weight=0.5, first_codebook_weight=100.0, chunk=4,
                                  report_at=(3,))
    result = evaluator(lm)
    ref = by_hand(lm, random_batches, 0.5, 100.0)
    assert_matches(result.metrics, ref, lm.dep_q)
    # 3 + 1 + 2 + 1 items with a target (the all -1 item is left out, as its weight is 0 in forward's loss).
    assert result.metrics["dialogue/sequences"] == 7 and result.sums.batches == 4
    curve = result.curve
    reached = ref["curve_tn"] > 0
    np.testing.assert_allclose(curve.text_ce[reached], (ref["curve_t"] / np.maximum(ref["curve_tn"], 1))[reached],
                               rtol=1e-5)
    assert (curve.text_tokens == ref["curve_tn"]).all()
    assert curve.items[0] == 7 and curve.items[-1] == 1
    window = slice(0, 3 + 12 + 1)
    assert result.metrics["dialogue/text_ce@3"] == pytest.approx(ref["curve_t"][window].sum()
                                                                 / ref["curve_tn"][window].sum(), rel=1e-5)
    # The weights change the weighted means only; chunks change nothing but rounding.
    one_frame = DialogueEvaluator(random_batches, text_padding_weight=0.5, first_codebook_weight=100.0,
                                  chunk=1)(lm).metrics
    for name, value in one_frame.items():
        assert value == pytest.approx(result.metrics[name], rel=1e-6), name
    plain = DialogueEvaluator(random_batches, chunk=16)(lm).metrics
    assert plain["dialogue/text_ce"] == pytest.approx(result.metrics["dialogue/text_ce"], rel=1e-6)
    assert plain["dialogue/text_ce_weighted"] == pytest.approx(plain["dialogue/text_ce"], rel=1e-12)
    assert plain["dialogue/audio_ce_weighted"] == pytest.approx(plain["dialogue/audio_ce"], rel=1e-12)


def test_demo_model_on_mimi_codes_equals_forward():
    lm, mimi = demo_lm(0), demo_mimi(0)
    wav = read_audio(sorted(ASSETS_DIR.glob("*.flac"))[0], mimi.sample_rate)
    model = encode_audio(mimi, wav[: 3 * mimi.sample_rate])            # [8, 38]
    user = encode_audio(mimi, wav[3 * mimi.sample_rate: 5 * mimi.sample_rate])
    T = model.shape[-1]
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(4, lm.text_card, (T,), generator=gen)
    text[torch.rand(T, generator=gen) < 0.6] = PAD
    first = torch.full((1, 1 + lm.n_q, T), -1)
    first[0, 0], first[0, 1:9] = text, model
    first[0, 9:, :user.shape[-1]] = user
    second = torch.full((2, 1 + lm.n_q, 20), -1)
    second[:, 0] = text[:20]
    second[0, 1:9], second[1, 1:9, :13] = model[:, 10:30], model[:, :13]
    second[:, 9:, :20] = model[:, 5:25]
    batches = [first, second]
    result = DialogueEvaluator(batches, text_padding_weight=0.5, first_codebook_weight=100.0)(lm)
    assert_matches(result.metrics, by_hand(lm, batches, 0.5, 100.0), lm.dep_q)


def test_ttt_streaming_state_is_the_whole_sequence_not_short_windows():
    lm = ttt_lm()
    codes = padded_random(lm, 2, 32, 5, text_lengths=[32, 30], audio_lengths=[32, 28])
    result = DialogueEvaluator([codes], chunk=8)(lm)
    whole = by_hand(lm, [codes])
    assert_matches(result.metrics, whole, lm.dep_q)
    windows = by_hand(lm, [codes[..., i:i + 8] for i in range(0, 32, 8)])
    assert abs(result.metrics["dialogue/audio_ce"] - windows["a"] / windows["an"]) > 1e-3


def test_every_call_scores_every_batch_after_a_training_step(lm):
    model = make_lm(seed=1)
    gen = torch.Generator().manual_seed(7)
    batches = []
    for i in range(50):
        B, T = 1 + i % 3, 3 + i % 6
        lengths = torch.randint(1, T + 1, (B,), generator=gen).tolist()
        batches.append(padded_random(model, B, T, 1000 + i, text_lengths=lengths, audio_lengths=lengths))
    evaluator = DialogueEvaluator(batches, chunk=4)
    first = evaluator(model)
    ref = by_hand(model, batches)
    assert first.metrics["dialogue/text_tokens"] == ref["tn"] and first.metrics["dialogue/audio_tokens"] == ref["an"]
    assert first.sums.batches == 50 and first.metrics["dialogue/sequences"] == sum(b.shape[0] for b in batches)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with no_compile():
        out = model(batches[0])
    torch.where(out.mask[..., None], out.logits, 0.0).logsumexp(-1).sum().backward()
    optimizer.step()
    second = evaluator(model)
    assert model.training                                        # the model comes back as given
    for name in ("dialogue/text_tokens", "dialogue/audio_tokens", "dialogue/sequences"):
        assert second.metrics[name] == first.metrics[name]
    assert second.metrics["dialogue/audio_ce"] != first.metrics["dialogue/audio_ce"]
    model.eval()
    assert_matches(second.metrics, by_hand(model, batches), model.dep_q)


def test_one_shot_iterators_are_refused_and_re_iterables_scored(lm, random_batches):
    for one_shot in ((b for b in random_batches), iter(random_batches), map(lambda b: b, random_batches)):
        with pytest.raises(TypeError, match="one-shot"):
            DialogueEvaluator(one_shot)
    with pytest.raises(ValueError, match="at least one batch"):
        DialogueEvaluator([])
    with pytest.raises(TypeError, match="one tensor"):
        DialogueEvaluator(random_batches[0])
    with pytest.raises(ConfigError, match="text_padding_weight"):
        DialogueEvaluator(random_batches, text_padding_weight=0.0)

    class Reiterable:
        def __iter__(self):
            return iter(random_batches)

    again = DialogueEvaluator(Reiterable())(lm)
    listed = DialogueEvaluator(random_batches)(lm)
    assert again.metrics == listed.metrics


def test_streaming_is_verified_in_the_forced_text_path(lm, random_batches):
    calls = []
    evaluator = DialogueEvaluator(random_batches, chunk=8)
    evaluator._verify = lambda model, chunk, text: calls.append((model, chunk, text))
    evaluator(lm)
    assert calls == [(lm, 8, "forced")]
    skipping = DialogueEvaluator(random_batches, verify_streaming=False)
    skipping._verify = lambda *args: calls.append(args)
    skipping(lm)
    assert len(calls) == 1


def test_bad_batches_are_named(lm):
    good = random_codes(lm, 2, 6)
    holed = good.clone()
    holed[1, 2, 3] = -1                      # a hole inside the model's audio
    with pytest.raises(ValueError, match=r"batch 1: item 1: .*codebook 1, frame 3"):
        DialogueEvaluator([good, holed])(lm)
    with pytest.raises(ValueError, match=r"batch 0: expected codes \[B, 5, T\]"):
        DialogueEvaluator([good[:, :4]])(lm)
    big = good.clone()
    big[0, 0, 0] = lm.text_card
    with pytest.raises(ValueError, match="batch 0: text tokens"):
        DialogueEvaluator([big])(lm)
    with pytest.raises(DataError, match="no item"):
        DialogueEvaluator([torch.full((1, 5, 4), -1)])(lm)


class SharedRanks(distributed.Ranks):
    """Two ranks run one after the other in this process: `gather` of the sums returns what the ranks so far put."""
    board: dict = {}

    def gather(self, value):
        if value is None or isinstance(value, str):          # the error exchange of `on_every_rank`
            return [value] * self.world
        self.board[self.rank] = value
        return [self.board[r] for r in sorted(self.board)]


def test_ranks_share_the_batches_and_rank_0_has_the_whole_set(lm, random_batches, tmp_path):
    whole = DialogueEvaluator(random_batches)(lm)
    SharedRanks.board = {}
    second = DialogueEvaluator(random_batches, ranks=SharedRanks(1, 2))(lm)
    first = DialogueEvaluator(random_batches, ranks=SharedRanks(0, 2))(lm)
    assert 0 < second.sums.batches < 4 and first.sums.batches == 4
    for name, value in whole.metrics.items():
        assert first.metrics[name] == pytest.approx(value, rel=1e-12), name
    assert second.write(tmp_path / "rank1") is None and not (tmp_path / "rank1").exists()


def test_results_files_and_evaluators(lm, random_batches, tmp_path):
    result = Evaluators([DialogueEvaluator(random_batches)])(lm)
    assert "dialogue/loss" in result.metrics and all(k.startswith("dialogue/") for k in result.metrics)
    paths = result.results["dialogue"].write(tmp_path / "out")
    assert [p.name for p in paths] == ["results.json", "curve.csv"]
    with RunFolder(tmp_path / "out") as run:
        assert run.task == "dialogue" and run.results["metrics"] == result.metrics
        assert run.results["counts"]["sequences"] == 7 and len(run.results["config"]["data"]["sha256"]) == 64
    rows = (tmp_path / "out" / "curve.csv").read_text().splitlines()
    assert rows[0] == "frame,items,text_tokens,text_ce,audio_tokens,audio_ce" and len(rows) == 1 + 33


# --- moshi-finetune's data layout --------------------------------------------------------------------------------

def test_build_text_stream_is_the_worked_example_of_the_notes():
    words = [(0.00, 0.30, [101, 102, 103]), (0.35, 0.50, [201]), (0.40, 0.60, [301, 302]), (1.00, 1.20, [401]),
             (1.30, 1.40, []), (1.44, 1.50, [501])]
    expected = [101, 102, 103, 0, 201, 301, 302, 3, 3, 3, 3, 0, 401, 3, 3, 3, 3, 0, 501, 3, 3, 3, 3, 3, 3]
    assert build_text_stream(words, 25) == expected
    # Two words due at one frame: only the last is written; a frame index is floor(12.5 * start), exact ones too.
    assert build_text_stream([(0.08, 0.1, [7]), (0.1, 0.2, [8, 9])], 4) == [0, 8, 9, 3]
    assert build_text_stream([(0.16, 0.3, [7])], 4) == [3, 0, 7, 3]


def test_windows_as_the_eval_loader_cuts_them(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.jsonl").write_text('{"path": "a.wav", "duration": 3.0}\n\n'
                                            '{"path": "/abs/b.wav", "duration": 2.5, "other": 1}\n')
    files = read_manifest(tmp_path / "d" / "m.jsonl")
    assert [f.path for f in files] == [tmp_path.resolve() / "d" / "a.wav", Path("/abs/b.wav")]
    assert [(w.file.path.name, w.start) for w in plan_windows(files, 1.0)] == \
        [("a.wav", 0.0), ("a.wav", 1.0), ("a.wav", 2.0), ("b.wav", 0.0), ("b.wav", 1.0), ("b.wav", 2.0)]
    assert [w.duration for w in plan_windows(files, None)] == [None, None]
    (tmp_path / "bad.jsonl").write_text('{"path": "a.wav", "duration": 1}\n{"path": "b.wav"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*duration"):
        read_manifest(tmp_path / "bad.jsonl")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny moshi-finetune dataset: two stereo files (16 kHz: resampled), alignments, a jsonl in another folder."""
    root = tmp_path_factory.mktemp("dialogues")
    tokenizer_path = write_tokenizer(root / "tokenizer.model")
    import sentencepiece
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    audio = root / "data_stereo"
    audio.mkdir()
    sr = 16000

    def write(name: str, seconds: float, words: list, channels: int = 2) -> None:
        pcm = np.stack([synthetic_speechlike(seconds, sr, seed=len(name) + c) for c in range(channels)])
        sphn.write_wav(str(audio / f"{name}.wav"), pcm if channels > 1 else pcm[0], sr)
        if words is not None:
            (audio / f"{name}.json").write_text(json.dumps({"alignments": words}))

    write("one", 3.0, [[" The", [0.50, 0.70], "SPEAKER_MAIN"], [" user", [0.60, 0.80], "SPEAKER_USER"],
                       [" lamp", [0.95, 1.30], "SPEAKER_MAIN"], [" river", [1.30, 1.50], "SPEAKER_MAIN"],
                       [" boat", [2.45, 2.55], "SPEAKER_MAIN"], [" zero", [2.60, 2.60], "SPEAKER_MAIN"]])
    write("two", 1.7, [[" sea", [0.0, 0.2], "SPEAKER_MAIN"], [" herons", [1.2, 1.69], "SPEAKER_MAIN"]])
    write("mono", 1.0, [], channels=1)
    write("noalign", 1.0, None)
    write("late", 1.0, [[" late", [1.5, 1.8], "SPEAKER_MAIN"]])
    jsonl = root / "lists" / "eval.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"path": f"../data_stereo/{n}.wav", "duration": d}) + "\n"
                             for n, d in (("one", 3.0), ("two", 1.7))))
    for name in ("mono", "noalign", "late", "missing"):
        (root / f"{name}.jsonl").write_text(json.dumps({"path": f"data_stereo/{name}.wav", "duration": 1.0}) + "\n")
    return {"root": root, "jsonl": jsonl, "tokenizer": tokenizer, "tokenizer_path": tokenizer_path,
            "mimi": make_tiny_mimi(0)}


def test_reader_places_text_tokens_on_their_frames(dataset):
    tok, mimi = dataset["tokenizer"], dataset["mimi"]
    batches = load_dialogues(dataset["jsonl"], mimi, tok, duration=1.0, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 17, 13)] * 2 + [(1, 17, 13)]
    items = [b[i] for b in batches for i in range(b.shape[0])]      # one: 0, 1, 2 s; two: 0, 1 s

    def stream(*words):      # frame -> tokens, PAD elsewhere, EOP before a word that follows padding
        row = [PAD] * 13
        for frame, word in words:
            ids = tok.encode(word)
            if row[frame - 1] == PAD and frame > 0:
                row[frame - 1] = EOP
            row[frame:frame + len(ids)] = ids
        return row[:13]

    assert tok.id_to_piece(tok.encode("lamp")[0]).startswith("\u2581")     # sentencepiece's dummy prefix
    # " The" at 0.50 s: frame 6; the user's word is not text; " lamp" starts at 0.95 s: frame 11, cut at the window.
    assert items[0][0].tolist() == stream((6, "The"), (11, "lamp"))
    # " river" at 1.30 s is frame 3 of the second window; " lamp", begun before it, is not there.
    assert items[1][0].tolist() == stream((3, "river"))
    # " boat" at 2.45 s: frame 5 of the third (0.45 * 12.5 = 5.625); " zero" (no duration) dropped.
    assert items[2][0].tolist() == stream((5, "boat"))
    assert items[3][0].tolist() == stream((0, "sea"))
    # The partial window of "two" (0.7 s: 9 audio frames): text over ceil(12.5 * 9) frames cut to 13, as moshi-finetune.
    last = items[4]
    assert last[0].tolist() == stream((2, "herons")) and (last[0] != -1).all()
    assert (last[1:, 9:] == -1).all() and (last[1:, :9] >= 0).all()
    # Left channel in rows 1-8, right in 9-16, each encoded alone from its window's 24 kHz samples.
    wav, _ = sphn.read(str(dataset["root"] / "data_stereo" / "one.wav"))
    from moshi_eval.data.librilight import resample
    left = resample(wav[0].astype(np.float32), 16000, 24000)[24000:48000]
    assert torch.equal(items[1][1:9], encode_audio(mimi, left))
    right = resample(wav[1].astype(np.float32), 16000, 24000)[:24000]
    assert torch.equal(items[0][9:17], encode_audio(mimi, right))
    # The intended text length: -1 after the audio.
    audio_len = DialogueBatches(dataset["jsonl"], mimi, tok, duration=1.0, batch_size=2, text_length="audio")[2]
    assert (audio_len[0, 0, 9:] == -1).all() and torch.equal(audio_len[0, 0, :9], last[0, :9])
    # Whole files: one item each, the file's frames.
    whole = load_dialogues(dataset["jsonl"], mimi, tok, duration=None, batch_size=2)
    assert len(whole) == 1 and whole[0].shape == (2, 17, 38)
    assert (whole[0][1, 1:, 22:] == -1).all() and whole[0][1, 0, 15] == tok.encode("herons")[0]


@pytest.mark.parametrize("name,error,match", [
    ("mono", DataError, r"mono\.wav: expected a stereo file .* got 1 channel"),
    ("noalign", DataError, r"noalign\.wav: its word alignments .*noalign\.json do not exist"),
    ("missing", AudioReadError, r"missing\.wav: no such file"),
    ("late", DataError, r"late\.json: entry 0 .* past the end of .*late\.wav"),
])
def test_bad_data_is_named(dataset, name, error, match):
    with pytest.raises(error, match=match):
        load_dialogues(dataset["root"] / f"{name}.jsonl", dataset["mimi"], dataset["tokenizer"], duration=1.0)


def test_task_runs_resumes_and_equals_forward(dataset, tmp_path, capsys):
    tok, mimi = dataset["tokenizer"], dataset["mimi"]
    lm = make_lm(n_q=16, dep_q=8, card=64, text_card=64, seed=2)
    config = DialogueConfig(dataset["jsonl"], duration=1.0, batch_size=2, text_padding_weight=0.5,
                            first_codebook_weight=100.0, chunk=8)
    task = DialogueTask(config, dataset["tokenizer_path"])
    run = TaskRun(task=task, out=tmp_path / "out", load=lambda: LoadedCheckpoint(lm, mimi, tok, {}),
                  identity={"test": "tiny"}, progress=False)
    code, result = run_task(run, keep_result=True)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out" / "dialogues").iterdir()) == \
        [f"batch_{i:06d}.npz" for i in range(3)]
    batches = load_dialogues(dataset["jsonl"], mimi, tok, duration=1.0, batch_size=2)
    assert_matches(result.metrics, by_hand(lm, batches, 0.5, 100.0), lm.dep_q)
    again_code, again = run_task(run, keep_result=True)
    assert again_code == 0 and again.resumed == 3 and again.metrics == result.metrics
    (tmp_path / "out" / "dialogues" / "batch_000001.npz").write_bytes(b"not a zip")
    third_code, third = run_task(run, keep_result=True)
    assert third_code == 0 and third.resumed == 2 and third.metrics == result.metrics
    assert "batch_000001.npz: unreadable" in capsys.readouterr().err
    with RunFolder(tmp_path / "out") as folder:
        assert folder.results["metrics"] == result.metrics and folder.results["config"]["data"]["windows"] == 5
    with pytest.raises(ConfigError, match="batch_size"):
        DialogueTask(DialogueConfig(dataset["jsonl"], batch_size=0), tok)


def test_the_training_loop_example_of_the_docs_runs(dataset, monkeypatch):
    doc = Path(__file__).resolve().parents[1] / "docs" / "dialogues.md"
    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) == 4
    logged = []
    wandb = type("wandb", (), {"log": staticmethod(lambda metrics, step: logged.append((step, metrics)))})
    monkeypatch.chdir(dataset["jsonl"].parent)
    namespace = {"mimi": dataset["mimi"], "spm": dataset["tokenizer"], "wandb": wandb, "step": 10,
                 "lm_model": make_lm(n_q=16, dep_q=8, card=64, text_card=64, seed=3)}
    exec(compile(code, str(doc), "exec"), namespace)
    (step, metrics), = logged
    assert step == 10 and metrics["dialogue/sequences"] == 2 and "dialogue/loss" in metrics


def test_cli_on_a_moshi_finetune_dataset_gives_the_library_numbers_bitwise(dataset, tmp_path, capsys):
    """`moshi-eval dialogues` on stereo wavs + alignments + a jsonl in moshi-finetune's layout, against
    `DialogueEvaluator(DialogueBatches(...))` on the same checkpoint loaded by moshi's own loader."""
    from helpers.checkpoint_factory import load_tiny_checkpoint, write_tiny_checkpoint
    from moshi_eval.cli.commands import main
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=4)
    out = tmp_path / "run"
    argv = ["dialogues", "--jsonl", str(dataset["jsonl"]), "--out", str(out), "--duration", "1.0",
            "--batch-size", "2", "--text-padding-weight", "0.5", "--first-codebook-weight", "100", "--chunk", "8",
            "--threads", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache"), *ckpt["cli_args"]]
    assert main(argv) == 0
    with RunFolder(out) as folder:
        cli_metrics = folder.results["metrics"]
    lm, mimi, tok = load_tiny_checkpoint(ckpt)
    batches = DialogueBatches(dataset["jsonl"], mimi, tok, duration=1.0, batch_size=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        library = DialogueEvaluator(batches, text_padding_weight=0.5, first_codebook_weight=100.0, chunk=8)(lm)
    finally:
        torch.set_num_threads(threads)
    assert cli_metrics == library.metrics                   # bitwise: the same floats, through results.json
    assert cli_metrics["dialogue/sequences"] == 5 and "dialogue/loss" in cli_metrics
    capsys.readouterr()
    for name, said in (("mono", "mono.wav"), ("noalign", "noalign"), ("missing", "missing.wav")):
        bad = list(argv)
        bad[bad.index("--jsonl") + 1] = str(dataset["root"] / f"{name}.jsonl")
        bad[bad.index("--out") + 1] = str(tmp_path / f"bad_{name}")
        assert main(bad) == 1
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
