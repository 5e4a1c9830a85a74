"""moshi_eval.demo (shipped audiobook, demo models) and tests/helpers/checkpoint_factory (moshi's real loader)."""
import json

import numpy as np
import pytest
import sentencepiece
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from safetensors.torch import load_file

from helpers.checkpoint_factory import (load_tiny_checkpoint, make_tiny_mimi, write_librilight_folder,
                                        write_tiny_checkpoint)
from moshi_eval.data.codes import encode_audio
from moshi_eval.data.librilight import discover_books, read_audio
from moshi_eval.demo import ASSETS_DIR, DEMO_LM_KWARGS, demo_audiobook, demo_lm, demo_mimi


@pytest.fixture(scope="module")
def audiobook(tmp_path_factory):
    return demo_audiobook(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def mimi():
    return demo_mimi()


def test_assets_small_and_flat():
    files = sorted(p for p in ASSETS_DIR.iterdir() if p.is_file())
    assert sum(p.stat().st_size for p in files) < 1.5e6
    assert all(p.parent == ASSETS_DIR for p in files)  # package_data glob "assets/*" ships them all


def test_demo_audiobook_layout_and_metadata(audiobook):
    books = discover_books(audiobook)
    assert [(b.speaker, b.book, len(b.chapters)) for b in books] == [
        ("1701", "the_lighthouse_keeper", 3), ("2450", "notes_on_the_river", 3)]
    total = 0.0
    for book in books:
        assert [c.path.name for c in book.chapters] == ["chapter_1.flac", "chapter_2.flac", "chapter_3.flac"]
        for index, chapter in enumerate(book.chapters, start=1):
            meta = chapter.metadata
            assert meta["speaker"] == book.speaker and meta["book"] == book.book and meta["chapter"] == index
            native = read_audio(chapter.path, 16000)
            assert meta["sample_rate"] == 16000
            assert abs(len(native) / 16000 - meta["duration"]) < 1e-3
            assert 10 <= meta["duration"] <= 25
            total += meta["duration"]
            assert np.abs(native).max() > 0.05  # speech, not silence
    # Each book is longer than demo_lm's attention context (250 frames = 20 s): the curve crosses it.
    assert 60 <= total <= 120
    # Copying again is idempotent.
    assert demo_audiobook(audiobook.parent) == audiobook
    assert len(discover_books(audiobook)) == 2


def test_demo_models_fit_each_other(mimi, audiobook):
    lm = demo_lm()
    assert isinstance(lm, LMModel) and isinstance(mimi, MimiModel) and not lm.training
    assert (lm.n_q, lm.dep_q, lm.card, lm.text_card) == (16, 8, 2048, 1000)
    assert lm.delays == DEMO_LM_KWARGS["delays"]
    assert mimi.num_codebooks == lm.dep_q and mimi.cardinality == lm.card
    assert (mimi.sample_rate, mimi.frame_rate, mimi.frame_size) == (24000, 12.5, 1920)
    assert lm.transformer.layers[0].self_attn.context == 250
    # Seeded: the same weights again.
    again = demo_lm()
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))


def test_demo_chapter_encodes_and_decodes(mimi, audiobook):
    chapter = discover_books(audiobook)[1].chapters[0]
    wav = read_audio(chapter.path, 24000)
    codes = encode_audio(mimi, wav)
    frames = -(-len(wav) // 1920)
    assert codes.shape == (8, frames)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2048
    # Not degenerate: the codebooks were initialized, speech gives many distinct codes per level.
    assert all(len(torch.unique(codes[k])) > 20 for k in range(8))
    with torch.no_grad():
        audio = mimi.decode(codes[None])
    assert audio.shape == (1, 1, frames * 1920) and torch.isfinite(audio).all()
    # Seeded codec: another build encodes identically.
    assert torch.equal(encode_audio(demo_mimi(), wav[: 1920 * 20]), codes[:, :20])


def test_demo_lm_scores_demo_codes(mimi, audiobook):
    lm = demo_lm()
    wav = read_audio(discover_books(audiobook)[0].chapters[0].path, 24000)
    audio = encode_audio(mimi, wav[: 40 * 1920])
    codes = torch.cat([torch.full((1, 40), lm.text_padding_token_id), audio, audio], 0)[None]
    with torch.no_grad():
        out = lm(codes)
    assert out.logits.shape == (1, 8, 40, 2048)
    assert torch.isfinite(out.logits[out.mask]).all()


def test_tiny_checkpoint_through_moshi_loader(tmp_path):
    files = write_tiny_checkpoint(tmp_path / "ckpt")
    lm, mimi, tokenizer = load_tiny_checkpoint(files)
    config = json.loads(files["config_path"].read_text())
    assert isinstance(lm, LMModel) and isinstance(mimi, MimiModel)
    assert isinstance(tokenizer, sentencepiece.SentencePieceProcessor)
    assert (lm.n_q, lm.dep_q, lm.card, lm.text_card) == (16, 8, config["card"], config["text_card"])
    assert lm.delays == config["delays"]
    # Loaded weights are the saved ones.
    saved = load_file(str(files["moshi_weights"]))
    assert saved.keys() == lm.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in lm.state_dict().items())
    # The loader set Mimi to max(dep_q, n_q - dep_q) = 8 codebooks, with the saved codebooks.
    assert mimi.num_codebooks == 8 and mimi.cardinality == config["card"] == lm.card
    wav = np.random.default_rng(0).standard_normal(1920 * 12).astype(np.float32) * 0.1
    assert torch.equal(encode_audio(mimi, wav), encode_audio(make_tiny_mimi(0), wav))
    # Tokenizer fits the LM: vocab == text_card, Moshi's padding id 3.
    assert tokenizer.vocab_size() == lm.text_card and tokenizer.pad_id() == lm.text_padding_token_id == 3
    ids = tokenizer.encode("the river rises")
    assert ids and all(0 <= i < lm.text_card for i in ids)
    # The loaded LM runs on codes made by the loaded Mimi.
    audio = encode_audio(mimi, wav)
    codes = torch.cat([torch.full((1, audio.shape[-1]), 3), audio, audio], 0)[None]
    with torch.no_grad():
        assert torch.isfinite(lm(codes).logits).any()
    assert files["cli_args"][files["cli_args"].index("--mimi-config") + 1] == str(files["mimi_config_path"])


def test_write_librilight_folder(tmp_path):
    root = write_librilight_folder(tmp_path, books=3, chapters=2, seconds=0.5)
    books = discover_books(root)
    assert [(b.speaker, b.book, len(b.chapters)) for b in books] == [
        ("spk0", "book0", 2), ("spk1", "book1", 2), ("spk2", "book2", 2)]
    for book in books:
        for chapter in book.chapters:
            assert chapter.path.suffix == ".flac" and chapter.metadata["sample_rate"] == 16000
            assert len(read_audio(chapter.path, 16000)) == 8000
            assert len(read_audio(chapter.path, 24000)) == 12000


def test_demo_rerun_into_the_same_folder_resumes(tmp_path, capsys):
    """The demo copied its audiobook again on every run (new mtimes), so a rerun into the
    same --out rescored every book ("its chapters changed"). A rerun now resumes; a changed file is restored."""
    from moshi_eval.cli.commands import main
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--max-chapters", "1", "--max-frames", "40", "--num-books", "1",
            "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "0"]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    second = json.loads((out / "results.json").read_text())
    assert "changed" not in err and second["runtime"]["books_resumed"] == 1
    assert second["runtime"]["books_scored_this_run"] == 0 and second["metrics"] == first["metrics"]
    chapter = sorted((out / "demo_audio").rglob("*.flac"))[0]
    chapter.write_bytes(b"damaged")
    demo_audiobook(out / "demo_audio")
    assert chapter.read_bytes() == next(ASSETS_DIR.glob(f"*__{chapter.parent.name}__{chapter.stem}.flac")).read_bytes()
