"""moshi_eval.data.codes: chunked streaming Mimi encoding, silence codes, code cache, book encoding."""
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.checkpoint_factory import make_tiny_mimi, synthetic_speechlike, write_flac, write_librilight_folder
from moshi_eval.data import codes as codes_mod
from moshi_eval.data.codes import CodeCache, codec_identity, encode_audio, encode_book, silence_codes
from moshi_eval.data.librilight import AudioReadError, discover_books, read_audio


@pytest.fixture(scope="module")
def mimi():
    return make_tiny_mimi(seed=0)  # encoder transformer context: 20 steps = 10 frames


@pytest.fixture(scope="module")
def long_wav():
    # 4 s minus part of a frame: 50 frames, far past the encoder transformer's context (10 frames), and
    # not a whole number of frames.
    return synthetic_speechlike(4.0, 24000, seed=3)[: 4 * 24000 - 1883] * 2


@pytest.fixture(scope="module")
def one_shot(mimi, long_wav):
    with torch.no_grad():
        return mimi.encode(torch.from_numpy(long_wav)[None, None])[0]


@pytest.mark.parametrize("chunk_frames", [1, 3, 7, 16, 49, 250])
def test_chunked_encode_equals_one_shot(mimi, long_wav, one_shot, chunk_frames):
    codes = encode_audio(mimi, long_wav, chunk_frames=chunk_frames)
    frames = -(-len(long_wav) // mimi.frame_size)
    assert codes.shape == (8, frames) == one_shot.shape
    assert codes.dtype == torch.int64 and codes.device.type == "cpu"
    assert torch.equal(codes, one_shot)
    assert not mimi.is_streaming


def test_setup_exercises_moshi_ring_cache(mimi, long_wav, one_shot, monkeypatch):
    """Premise of the test above: without widening the KV caches, chunked streaming differs from one-shot
    (moshi's ring cache of `context` steps drops keys that a multi-step call still needs)."""
    monkeypatch.setattr(codes_mod, "_widen_kv_caches", lambda model, extra_steps: None)
    assert not torch.equal(encode_audio(mimi, long_wav, chunk_frames=16), one_shot)


def test_padding_is_zeros(mimi, long_wav):
    """The zero-padded end of the last frame: the same codes as encoding explicitly padded audio."""
    n = 5 * mimi.frame_size + 1
    padded = np.concatenate([long_wav[:n], np.zeros(mimi.frame_size - 1, np.float32)])
    assert torch.equal(encode_audio(mimi, long_wav[:n], 2), encode_audio(mimi, padded, 4))
    assert encode_audio(mimi, long_wav[:n], 2).shape == (8, 6)


def test_encode_audio_bad_input(mimi):
    with pytest.raises(ValueError, match="wav"):
        encode_audio(mimi, np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="wav"):
        encode_audio(mimi, np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="wav"):
        encode_audio(mimi, np.zeros(100, np.int16))
    with pytest.raises(ValueError, match="chunk_frames"):
        encode_audio(mimi, np.zeros(100, np.float32), chunk_frames=0)
    with pytest.raises(ValueError, match="expected a codec set to 4 codebooks"):
        encode_audio(mimi, np.zeros(100, np.float32), num_codebooks=4)
    with mimi.streaming(1):
        with pytest.raises(RuntimeError, match="already in streaming"):
            encode_audio(mimi, np.zeros(100, np.float32))


def test_silence_codes(mimi):
    codes = silence_codes(mimi, 30)
    with torch.no_grad():
        reference = mimi.encode(torch.zeros(1, 1, 30 * mimi.frame_size))[0]
    assert codes.shape == (8, 30) and codes.dtype == torch.int64
    assert torch.equal(codes, reference)
    assert torch.equal(silence_codes(mimi, 5), codes[:, :5])  # causal: a prefix of a longer silence
    with pytest.raises(ValueError, match="frames"):
        silence_codes(mimi, 0)


def test_codec_identity():
    a, b = make_tiny_mimi(seed=0), make_tiny_mimi(seed=0)
    assert codec_identity(a) == codec_identity(b)
    assert codec_identity(a) != codec_identity(make_tiny_mimi(seed=1))
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert codec_identity(a) != codec_identity(b)
    c = make_tiny_mimi(seed=0)
    c.set_num_codebooks(4)
    assert codec_identity(a) != codec_identity(c)


@pytest.fixture()
def library(tmp_path):
    return write_librilight_folder(tmp_path / "ll", books=2, chapters=3, seconds=[1.0, 0.5, 1.3, 0.7, 0.9, 0.3])


def test_encode_book_concatenates_chapters(mimi, library):
    book = discover_books(library)[0]
    codes = encode_book(mimi, book)
    with torch.no_grad():
        parts = [mimi.encode(torch.from_numpy(read_audio(c.path))[None, None])[0] for c in book.chapters]
    assert torch.equal(codes, torch.cat(parts, -1))
    assert codes.shape[-1] == sum(-(-round(s * 24000) // 1920) for s in (1.0, 0.5, 1.3))


def test_cache_hits_on_second_run_and_never_reencodes(mimi, library, tmp_path, monkeypatch):
    books = discover_books(library)
    cache = CodeCache(tmp_path / "cache", codec_identity(mimi))
    first = [encode_book(mimi, b, cache) for b in books]
    assert (cache.hits, cache.misses) == (0, 6)

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again despite a warm cache")

    monkeypatch.setattr(codes_mod, "encode_audio", no_encoding)
    cache2 = CodeCache(tmp_path / "cache", codec_identity(mimi))  # a new run, same folder
    second = [encode_book(mimi, b, cache2) for b in books]
    assert (cache2.hits, cache2.misses) == (6, 0)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave no temporary file


def test_cache_invalidation(mimi, library, tmp_path):
    book = discover_books(library)[0]
    root = tmp_path / "cache"
    cache = CodeCache(root, codec_identity(mimi))
    encode_book(mimi, book, cache)
    # New content for one chapter: that chapter only is a miss, and its codes follow the new audio.
    path = book.chapters[1].path
    write_flac(path, synthetic_speechlike(0.8, 16000, seed=99), 16000)
    cache = CodeCache(root, codec_identity(mimi))
    codes = encode_book(mimi, book, cache)
    assert (cache.hits, cache.misses) == (2, 1)
    with torch.no_grad():
        fresh = torch.cat([mimi.encode(torch.from_numpy(read_audio(c.path))[None, None])[0]
                           for c in book.chapters], -1)
    assert torch.equal(codes, fresh)
    # Another codec: everything is a miss.
    other = make_tiny_mimi(seed=1)
    cache = CodeCache(root, codec_identity(other))
    encode_book(other, book, cache)
    assert (cache.hits, cache.misses) == (0, 3)


def test_corrupt_cache_entry_is_a_miss(mimi, library, tmp_path):
    book = discover_books(library)[0]
    cache = CodeCache(tmp_path / "cache", codec_identity(mimi))
    expected = encode_book(mimi, book, cache)
    setting = codes_mod.encoding_setting("cpu")
    entry = cache.entry_path(book.chapters[0].path, setting=setting)
    entry.write_bytes(b"truncated")
    cache = CodeCache(tmp_path / "cache", codec_identity(mimi))
    assert torch.equal(encode_book(mimi, book, cache), expected)
    assert (cache.hits, cache.misses) == (2, 1)
    assert cache.get(book.chapters[0].path, setting=setting) is not None  # rewritten


def test_cache_put_validates(tmp_path, library):
    cache = CodeCache(tmp_path / "c", "abc")
    chapter = discover_books(library)[0].chapters[0].path
    with pytest.raises(ValueError, match="codes"):
        cache.put(chapter, torch.zeros(8, 3))
    with pytest.raises(ValueError, match="codec_id"):
        CodeCache(tmp_path / "c", "")


def test_encode_book_names_the_bad_chapter(mimi, library):
    book = discover_books(library)[1]
    bad: Path = book.chapters[2].path
    bad.write_bytes(b"not a flac file at all" * 10)
    with pytest.raises(AudioReadError) as info:
        encode_book(mimi, book)
    assert info.value.path == bad and str(bad) in str(info.value)


def test_cache_key_includes_the_encoding_chunk_length(mimi, library, tmp_path):
    """Codes encoded in chunks of another length may differ (a nearly tied code can flip): never reused."""
    book = discover_books(library)[0]
    cache = CodeCache(tmp_path / "cache", codec_identity(mimi))
    encode_book(mimi, book, cache, chunk_frames=250)
    path = book.chapters[0].path
    assert cache.entry_path(path, 250) != cache.entry_path(path, 5)
    cache = CodeCache(tmp_path / "cache", codec_identity(mimi))
    encode_book(mimi, book, cache, chunk_frames=5)
    assert (cache.hits, cache.misses) == (0, 3)
    for chunk in (250, 5):
        assert cache.get(path, chunk, codes_mod.encoding_setting("cpu", chunk)) is not None


def test_encoding_runs_on_a_fixed_thread_count_and_restores_the_callers(mimi, long_wav, monkeypatch):
    """Mimi's codes depend on the torch thread count (a nearly tied code flips), so the
    codes of a run depended on --threads and on which run filled the cache. Encoding now runs on
    `ENCODE_THREADS` threads whatever the caller set, and gives the caller's count back."""
    seen = []
    real_encode = type(mimi).encode

    def spy(self, x):
        seen.append(torch.get_num_threads())
        return real_encode(self, x)

    monkeypatch.setattr(type(mimi), "encode", spy)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(encode_audio(mimi, long_wav, 16))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {codes_mod.ENCODE_THREADS}
    assert torch.equal(results[0], results[1])


def test_cache_filled_under_another_setting_is_not_used(mimi, library, tmp_path):
    """Codes encoded on another device (or thread count) are another cache entry."""
    book = discover_books(library)[0]
    path = book.chapters[0].path
    cache = CodeCache(tmp_path / "cache", codec_identity(mimi))
    gpu = dict(codes_mod.encoding_setting("cpu"), device="cuda (some GPU)", threads=None)
    cache.put(path, torch.zeros(8, 13, dtype=torch.int64), setting=gpu)     # as a GPU run would store it
    assert cache.get(path, setting=gpu) is not None
    codes = encode_book(mimi, book, CodeCache(tmp_path / "cache", codec_identity(mimi)))
    assert torch.equal(codes, encode_book(mimi, book))                       # not the GPU run's codes


def test_valid_entry_of_another_chapter_at_this_key_is_a_miss(mimi, library, tmp_path):
    """A valid entry of chapter A copied to chapter B's key was used as B's codes."""
    book = discover_books(library)[0]
    a, b = book.chapters[0].path, book.chapters[2].path
    cache = CodeCache(tmp_path / "cache", codec_identity(mimi))
    expected = encode_book(mimi, book, cache)
    setting = codes_mod.encoding_setting("cpu")
    cache.entry_path(b, setting=setting).write_bytes(cache.entry_path(a, setting=setting).read_bytes())
    cache = CodeCache(tmp_path / "cache", codec_identity(mimi))
    assert cache.get(b, setting=setting) is None
    assert torch.equal(encode_book(mimi, book, cache), expected)
