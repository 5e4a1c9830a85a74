"""`moshi-eval` end to end through moshi's real loader (tiny checkpoint on disk) and LibriLight folders.

In-process `main([...])` for speed; a subprocess only for the SIGTERM test.
"""
import argparse
import csv
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from moshi.utils.compile import no_compile
from safetensors.torch import load_file, save_file

from helpers.cli_helpers import FAST, librilight_args, results, sequences, sigterm_after_first_book
from helpers.checkpoint_factory import load_tiny_checkpoint, write_librilight_folder, write_tiny_checkpoint
from moshi_eval.files import report
from moshi_eval.cli.commands import main
from moshi_eval.data.codes import encode_book
from moshi_eval.data.librilight import DataError, discover_books
from moshi_eval.errors import EXIT_ERROR, EXIT_USAGE
from moshi_eval.scoring.sequences import DEFAULT_CHUNK

_results, _npz = results, sequences


def _run(world, out, *extra, audio=None, ckpt_args=None):
    args = librilight_args(world, out, *extra, audio=audio, ckpt_args=ckpt_args)
    return main(args), args


def test_librilight_outputs_consistent_and_cache_hit(world, capsys):
    out = world["root"] / "out_default"
    code, _ = _run(world, out, "--batch-size", "2", "--report-at", "10,40,5000", "--report-window", "5",
                   "--bucket", "20")
    assert code == 0
    summary = capsys.readouterr().out
    assert "frames/s" in summary and "3 book(s)" in summary
    res = _results(out)
    seqs = _npz(out)
    assert res["num_books"] == 3 and len(seqs) == 3 and res["skipped"] == []
    frames = {b["sequence_id"]: b["frames"] for b in res["books"]}
    assert frames == {sid: s["audio_ce"].shape[0] for sid, s in seqs.items()}
    assert len(set(frames.values())) == 3                                  # different lengths
    for sid, s in seqs.items():
        T = frames[sid]
        assert s["codebook_ce"].shape == (8, T) and s["text_token"].shape == (T,)
        assert np.isfinite(s["codebook_ce"]).all()
        np.testing.assert_allclose(s["audio_ce"], s["codebook_ce"].mean(0), atol=1e-5)
        assert ((s["text_token"] >= 0) & (s["text_token"] < 64)).all()      # predicted text tokens
    assert res["runtime"]["frames"] == sum(frames.values())
    assert res["runtime"]["frames_per_s"] > 0
    assert set(res["versions"]) >= {"moshi", "torch", "moshi_patch"}
    assert res["model"]["context"] == 24 and res["model"]["dep_q"] == 8
    assert res["codec"]["num_codebooks"] == 8
    # Metrics: the mean curve at frame 10 is the mean over the 3 books, frame 5000 absent with a reason.
    at = res["summary"]["audio_ce"]["positions"]
    assert at[0]["present"] and at[0]["point_count"] == 3
    assert at[0]["point"] == pytest.approx(np.mean([s["audio_ce"][10] for s in seqs.values()]), abs=1e-5)
    assert at[1]["point_count"] == sum(1 for T in frames.values() if T > 40)
    assert not at[2]["present"] and at[2]["point"] is None and "5000" in at[2]["absent_reason"]
    assert len(res["summary"]["codebook_ce"]) == 8
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert len(rows) == max(frames.values())
    reaching = [sum(1 for T in frames.values() if T > t) for t in range(len(rows))]
    assert [int(r["num_sequences"]) for r in rows] == reaching
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert res["runtime"]["code_cache"]["misses"] == 6

    # A second run (other --out, same cache): every chapter comes from the code cache, same numbers.
    out2 = world["root"] / "out_default_again"
    assert _run(world, out2, "--batch-size", "2")[0] == 0
    res2 = _results(out2)
    assert res2["runtime"]["code_cache"] == dict(res["runtime"]["code_cache"], hits=6, misses=0)
    for sid, s in _npz(out2).items():
        np.testing.assert_allclose(s["codebook_ce"], seqs[sid]["codebook_ce"], atol=1e-5)

    # Same --out again: nothing left to score, results.json rebuilt from the files.
    assert _run(world, out, "--batch-size", "2")[0] == 0
    res3 = _results(out)
    assert res3["runtime"]["frames"] == 0 and res3["runtime"]["frames_per_s"] is None
    assert res3["runtime"]["books_resumed"] == 3 and res3["num_books"] == 3


def _forward_codebook_ce(lm, codes: torch.Tensor) -> np.ndarray:
    """[8, T] CE from LMModel.forward: text = padding id, user stream -1, audio padded by -1 (max_delay)."""
    delay = max(lm.delays)
    T = codes.shape[1]
    audio = torch.cat([codes, torch.full((8, delay), -1)], dim=1)
    n = T + delay
    full = torch.cat([torch.full((1, n), lm.text_padding_token_id), audio,
                      torch.full((lm.n_q - lm.dep_q, n), -1)], dim=0)[None]
    with torch.no_grad(), no_compile():
        logits = lm(full).logits[0, :, :T].float()                        # [8, T, card]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1),
                           reduction="none").reshape(8, T).numpy()


def test_oracle_through_cli_and_interrupted_run_resumes(world, monkeypatch, capsys):
    """--text pad --user-stream zero: saved codebook_ce == LMModel.forward CE (1e-4); resume == uninterrupted."""
    opts = ["--text", "pad", "--user-stream", "zero", "--batch-size", "2"]
    full = world["root"] / "out_pad_full"
    assert _run(world, full, *opts)[0] == 0
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    seqs = _npz(full)
    for book in discover_books(world["audio"]):
        codes = encode_book(mimi, book)
        np.testing.assert_allclose(seqs[book.sequence_id]["codebook_ce"], _forward_codebook_ce(lm, codes),
                                   atol=1e-4, rtol=0)
        assert (seqs[book.sequence_id]["text_token"] == lm.text_padding_token_id).all()

    # Interrupted after the first finished book (as Ctrl-C would, between two frames).
    out = world["root"] / "out_pad_resumed"
    real_write = report.write_sequence
    written = []

    def write_then_interrupt(*args, **kwargs):
        path = real_write(*args, **kwargs)
        written.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_sequence", write_then_interrupt)
    code, argv = _run(world, out, *opts)
    assert code == 130
    err = capsys.readouterr().err
    assert "Resume with the same command" in err and ("moshi-eval " + " ".join(argv)) in err
    assert len(written) == 1 and not (out / "results.json").exists()
    first = report.read_sequence(written[0])
    monkeypatch.setattr(report, "write_sequence", real_write)

    assert _run(world, out, *opts)[0] == 0
    res = _results(out)
    assert res["runtime"]["books_resumed"] == 1 and res["num_books"] == 3
    resumed = _npz(out)
    np.testing.assert_array_equal(resumed[written[0].stem]["codebook_ce"], first["codebook_ce"])
    assert resumed.keys() == seqs.keys()
    for sid in seqs:    # Each book in the batch it had in the uninterrupted run: bitwise the same numbers.
        np.testing.assert_array_equal(resumed[sid]["codebook_ce"], seqs[sid]["codebook_ce"])
    assert res["metrics"] == _results(full)["metrics"]

    # The same --out with another configuration: refused, nothing overwritten.
    before = (out / "results.json").read_bytes()
    assert _run(world, out, "--text", "predicted", "--user-stream", "zero")[0] == 1
    assert "another configuration" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


@pytest.mark.slow
def test_sigterm_keeps_finished_books_and_prints_resume_command(world):
    # 3 books of 75 frames: one synthesized chapter, copied (writing FLAC in numpy is the slow part).
    audio = write_librilight_folder(world["root"] / "libri_long", books=1, chapters=1, seconds=6.0, seed=5)
    for b in (1, 2):
        shutil.copytree(audio / "spk0", audio / f"spk{b}")
    out = world["root"] / "out_sigterm"
    args = ["librilight", "--audio-dir", str(audio), "--out", str(out), "--cache-dir", str(world["cache"]),
            "--batch-size", "1", "--text", "pad", "--chunk", "1", *FAST, *world["ckpt"]["cli_args"]]
    # One frame per call: slow enough for the signal to land between two books.
    returncode, err = sigterm_after_first_book(args, out)
    assert returncode == 130, err
    assert "Resume with the same command" in err
    done = list((out / "sequences").glob("*.npz"))
    assert 1 <= len(done) < 3
    for p in done:
        report.read_sequence(p)                        # complete, readable files
    assert not [p for p in (out / "sequences").iterdir() if p.suffix != ".npz"]   # no temporary leftovers
    assert main(args) == 0
    res = _results(out)
    assert res["num_books"] == 3 and res["runtime"]["books_resumed"] == len(done)


def test_unreadable_book_skipped_or_strict(world, capsys):
    audio = world["root"] / "libri_corrupt"
    shutil.copytree(world["audio"], audio)
    bad = audio / "spk1" / "book1" / "ch2.flac"
    bad.write_bytes(b"fLaC" + b"\x00" * 100)
    out = world["root"] / "out_corrupt"
    assert _run(world, out, audio=audio)[0] == 0
    res = _results(out)
    assert res["num_books"] == 2
    assert [s["sequence_id"] for s in res["skipped"]] == ["spk1__book1"]
    assert str(bad) in res["skipped"][0]["reason"] and res["skipped"][0]["path"] == str(bad)
    assert "spk1__book1" not in _npz(out)
    capsys.readouterr()
    assert _run(world, world["root"] / "out_corrupt_strict", "--strict", audio=audio)[0] == 1
    err = capsys.readouterr().err
    assert "error" in err and str(bad) in err


def test_bad_inputs_give_clear_errors(world, tmp_path, capsys):
    def fails(match, *extra, exit_code=EXIT_ERROR, **kw):
        code, _ = _run(world, tmp_path / f"out{len(os.listdir(tmp_path))}", *extra, **kw)
        err = capsys.readouterr().err
        assert code == exit_code, err
        assert match in err, err
        assert "Traceback" not in err

    fails("does not exist", audio=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    fails("is empty", audio=tmp_path / "empty")
    (tmp_path / "noaudio" / "spk" / "book").mkdir(parents=True)
    (tmp_path / "noaudio" / "spk" / "book" / "notes.txt").write_text("x")
    fails("no audio files", audio=tmp_path / "noaudio")
    fails("every book is shorter than --min-frames 500", "--min-frames", "500")
    fails("larger than --max-frames", "--min-frames", "50", "--max-frames", "10", exit_code=EXIT_USAGE)
    fails("no checkpoint: give --hf-repo", ckpt_args=["--moshi-weight", str(world["ckpt"]["moshi_weights"])])
    fails("--moshi-weight: no such file",
          ckpt_args=["--config", str(world["ckpt"]["config_path"]), "--moshi-weight", str(tmp_path / "x"),
                     "--mimi-weight", str(world["ckpt"]["mimi_weights"])])

    # A codec that does not fit the model: LM with card 32, Mimi with 64 entries per codebook.
    small = write_tiny_checkpoint(tmp_path / "ckpt32", card=32)
    args = list(small["cli_args"])
    args[args.index("--mimi-weight") + 1] = str(world["ckpt"]["mimi_weights"])
    args[args.index("--mimi-config") + 1] = str(world["ckpt"]["mimi_config_path"])
    fails("codec does not fit the model", ckpt_args=args)

    # Non-finite logits: a NaN in codebook 2's output projection.
    poisoned = tmp_path / "poisoned.safetensors"
    state = load_file(str(world["ckpt"]["moshi_weights"]))
    state["linears.2.weight"][0, 0] = float("nan")
    save_file(state, str(poisoned))
    args = list(world["ckpt"]["cli_args"])
    args[args.index("--moshi-weight") + 1] = str(poisoned)
    fails("non-finite logits for spk0__book0 at frame 0 (audio codebook 2)", "--num-books", "1",
          ckpt_args=args)

    with pytest.raises(SystemExit) as exit_info:
        main(["librilight", "--audio-dir", str(world["audio"]), "--out", str(tmp_path), "--batch-size", "0"])
    assert exit_info.value.code == 2


def test_demo_command(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--max-chapters", "1", "--max-frames", "80",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    res = _results(out)
    seqs = _npz(out)
    assert res["num_books"] == len(seqs) == 2
    assert all(s["audio_ce"].shape == (80,) for s in seqs.values())
    assert res["model"]["demo"] is True and res["model"]["context"] == 250
    assert (out / "curve.png").exists() and (out / "curve.csv").exists()
    assert "frames/s" in capsys.readouterr().out


def test_min_frames_filters_books_before_counting_them(tmp_path):
    """`--num-books 1 --min-frames N` picks the first book long enough, not the first book then a filter."""
    from moshi_eval.tasks.librilight import select_librilight_books
    # spk0's book lasts 2 x 1 s = 25 frames, spk1's 2 x 5 s = 125 frames, spk2's 2 x 6 s = 150 frames.
    root = write_librilight_folder(tmp_path / "audio", books=3, chapters=2, seconds=[1, 1, 5, 5, 6, 6])
    args = argparse.Namespace(audio_dir=root, num_books=1, max_chapters=None, min_frames=100)
    assert [b.speaker for b in select_librilight_books(args)] == ["spk1"]
    args.num_books = None
    assert [b.speaker for b in select_librilight_books(args)] == ["spk1", "spk2"]
    # --max-chapters cuts before the length filter: one 5 s chapter is 62.5 frames.
    args.max_chapters = 1
    with pytest.raises(DataError, match="every book is shorter than --min-frames 100"):
        select_librilight_books(args)


@pytest.mark.parametrize("text", ["predicted", "pad"])
@pytest.mark.parametrize("user_stream", ["silence", "zero"])
def test_chunked_and_one_frame_scoring_agree(world, text, user_stream):
    """`--chunk 1` (one streaming step per frame) and the default chunk give the same per-frame losses and
    text tokens; results.json says how the chunks went."""
    runs = {}
    for chunk in (["--chunk", "1"], ["--chunk", "16"], []):       # [] : the default chunk
        out = world["root"] / f"out_chunk_{text}_{user_stream}_{'_'.join(chunk)}"
        assert _run(world, out, *chunk, "--text", text, "--user-stream", user_stream, "--batch-size", "2")[0] == 0
        runs[" ".join(chunk)] = (_npz(out), _results(out))
    (one, one_res), (chunked, res) = runs["--chunk 1"], runs["--chunk 16"]
    default, default_res = runs[""]
    assert default_res["config"]["chunk"] == DEFAULT_CHUNK
    assert one.keys() == chunked.keys() and len(one) == 3
    for sid in one:
        for other in (chunked, default):
            np.testing.assert_array_equal(one[sid]["text_token"], other[sid]["text_token"])
            np.testing.assert_allclose(one[sid]["codebook_ce"], other[sid]["codebook_ce"], atol=1e-4, rtol=0)
    assert res["config"]["chunk"] == 16 and one_res["config"]["chunk"] == 1
    chunks = res["runtime"]["chunks"]
    assert chunks["chunked_calls"] > 0 and chunks["passes_per_chunk"] >= 1
    if text == "predicted":
        assert chunks["text_guesses"] > 0 and 0 <= chunks["text_guess_accepted_share"] <= 1
    else:
        assert chunks["passes_per_chunk"] == 1 and chunks["text_guess_accepted_share"] is None
    assert one_res["runtime"]["chunks"]["chunked_calls"] == 0
