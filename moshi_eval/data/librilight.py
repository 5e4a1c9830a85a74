"""LibriLight-layout audiobooks: discovery, selection, and audio reading at Mimi's sample rate.

Layout: `<root>/<speaker>/<book>/<chapter>.<ext>` with `<ext>` one of `AUDIO_EXTENSIONS`, and optionally
`<chapter>.json` beside each audio file (LibriLight's per-file metadata). One book is one eval sequence:
its chapters in natural order ("2" before "10").

Audio is decoded with `sphn.read` and resampled here, with a windowed-sinc polyphase filter, rather than
with `sphn.read(..., sample_rate=)` / `sphn.resample`: sphn's resampler (as of sphn 0.2) delays the signal
by a fixed number of samples and drops the same amount at the end (768 samples at 24 kHz for 16 -> 24 kHz),
so lengths and alignment would be off.
"""
from dataclasses import dataclass
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import re
import stat
import typing as tp

import numpy as np
import sphn
import torch

from ..errors import MoshiEvalError

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3")   # of one chapter in two formats, the first is kept
logger = logging.getLogger(__name__)
TRUNCATION_SLACK_SECONDS = 0.1  # decoded audio this much shorter than its header's duration: an error


class DataError(MoshiEvalError, ValueError):
    """A problem with the audio data given to the eval: the message names the path and what was wrong."""


class AudioReadError(DataError):
    """An audio file that cannot be read (missing, corrupt, unsupported, or without samples)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read audio file {self.path}: {reason}")


def natural_key(name: str) -> tuple:
    """Sort key putting "2" before "10": digit runs compare as integers, the rest as lowercase text."""
    parts = re.split(r"(\d+)", name)
    key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p != "")
    return key, name  # the raw name breaks ties ("a" vs "A", "1" vs "01") deterministically


@dataclass
class Chapter:
    """One audio file of a book, with the parsed `.json` metadata beside it (None when there is none)."""
    path: Path
    metadata: dict | None = None


@dataclass
class Book:
    """One LibriLight book: `chapters` in natural order. It is one eval sequence."""
    speaker: str
    book: str
    chapters: list[Chapter]

    @property
    def sequence_id(self) -> str:
        """Filesystem-safe id, unique across books of one root: `{speaker}__{book}` with other characters
        than `[A-Za-z0-9._-]` replaced by `_`, plus a short hash of the raw names when that changed them
        (so two distinct names that sanitize alike still get distinct ids)."""
        raw = f"{self.speaker}__{self.book}"
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", raw)
        if safe != raw or safe.startswith("."):
            # surrogateescape: a folder name that is not valid UTF-8 hashes by its bytes.
            digest = hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            safe = f"{safe.lstrip('.') or 'book'}-{digest}"
        return safe


def _read_metadata(audio_path: Path) -> dict | None:
    """The `.json` beside `audio_path`, or None when there is none.

    A metadata file that exists but is not a JSON object raises DataError naming it: a corrupt file is a
    broken dataset, and silently dropping it would hide that (policy chosen over warn-and-ignore)."""
    meta_path = audio_path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"corrupt metadata file {meta_path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise DataError(f"metadata file {meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _audio_entries(folder: Path) -> list[Path]:
    """The non-hidden entries of `folder` with an audio extension that are not folders: regular files, and
    anything else (dangling links, devices, FIFOs), which reading rejects with the reason."""
    return [p for p in folder.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS and not p.is_dir()]


def _book_chapters(book_dir: Path) -> list[Path]:
    """The chapter files of a book folder in natural order, each chapter once: of `c1.flac` and `c1.wav`
    (one chapter in two formats) the first in `AUDIO_EXTENSIONS` order is kept; each dropped file and each
    ignored sub-folder with audio is a warning naming it."""
    files = sorted(_audio_entries(book_dir), key=lambda p: natural_key(p.name))
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f)
    kept: list[Path] = []
    for f in files:
        group = by_stem[f.stem]
        first = min(group, key=lambda p: (AUDIO_EXTENSIONS.index(p.suffix.lower()), p.name))
        if f is not first:
            logger.warning("%s: the same chapter as %s in another format: ignored (one chapter is counted once)",
                           f, first.name)
            continue
        kept.append(f)
    for sub in book_dir.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            if any(p.suffix.lower() in AUDIO_EXTENSIONS for p in sub.rglob("*")):
                logger.warning("%s: audio in a sub-folder of a book folder is ignored (layout "
                               "<root>/<speaker>/<book>/<chapter>)", sub)
    return kept


def discover_books(audio_dir: str | Path) -> list[Book]:
    """All books under `audio_dir` in LibriLight layout `<root>/<speaker>/<book>/<chapter>.<ext>`.

    Books are sorted by (speaker, book) and chapters by file name, both in natural order. Hidden entries
    (names starting with ".") are skipped; book folders without audio files are skipped. Nothing is
    dropped or counted twice silently: audio at another depth (in the root, in a speaker folder, in a
    sub-folder of a book) is a warning naming it; a chapter in two formats counts once (`_book_chapters`);
    a book folder reached twice (a linked speaker or book folder) counts once, with a warning.

    Raises:
        DataError: `audio_dir` missing, not a directory, empty, or with no audio file in the layout;
            a corrupt `.json` metadata file.
    """
    root = Path(audio_dir)
    if not root.exists():
        raise DataError(f"audio dir {root} does not exist")
    if not root.is_dir():
        raise DataError(f"audio dir {root} is not a directory")
    if not any(root.iterdir()):
        raise DataError(f"audio dir {root} is empty")
    speakers = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: natural_key(p.name))
    books: list[Book] = []
    seen: dict[Path, Path] = {}          # resolved book folder -> the folder it was first found as
    for speaker in speakers:
        stray = sorted(p.name for p in _audio_entries(speaker))
        if stray:
            logger.warning("%s: %d audio file(s) directly in a speaker folder are ignored (e.g. %s; layout "
                           "<root>/<speaker>/<book>/<chapter>)", speaker, len(stray), stray[0])
        book_dirs = sorted((p for p in speaker.iterdir() if p.is_dir() and not p.name.startswith(".")),
                           key=lambda p: natural_key(p.name))
        for book_dir in book_dirs:
            resolved = book_dir.resolve()
            if resolved in seen:
                logger.warning("%s: the same folder as %s (a link): its book is counted once", book_dir,
                               seen[resolved])
                continue
            seen[resolved] = book_dir
            # A dangling symbolic link is a chapter too: reading it fails, and the book is skipped with the
            # reason (or the run stops with --strict) instead of being scored without it.
            files = _book_chapters(book_dir)
            if files:
                chapters = [Chapter(path=f, metadata=_read_metadata(f)) for f in files]
                books.append(Book(speaker=speaker.name, book=book_dir.name, chapters=chapters))
    stray = [p.name for p in _audio_entries(root)][:3]
    if not books:
        hint = (f" (audio files found directly in it, e.g. {stray}: they must be in "
                f"<speaker>/<book>/ subfolders)" if stray else "")
        raise DataError(
            f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in LibriLight layout "
            f"<root>/<speaker>/<book>/<chapter> under {root}{hint}")
    if stray:
        logger.warning("%s: audio files directly in the root are ignored (e.g. %s; layout "
                       "<root>/<speaker>/<book>/<chapter>)", root, stray[0])
    return books


def book_seconds(book: Book) -> float:
    """Total duration in seconds of a book's chapters, from the file headers (`sphn.durations`, no decoding).

    Raises:
        AudioReadError: a chapter whose duration cannot be read; names the file.
    """
    for c in book.chapters:     # sphn would block on a FIFO, or read /dev/zero forever
        check_audio_file(c.path)
    durations = sphn.durations([str(c.path) for c in book.chapters])
    for chapter, duration in zip(book.chapters, durations):
        if duration is None:
            raise AudioReadError(chapter.path, "cannot read its duration (missing, corrupt or unsupported)")
    return float(sum(durations))


def select_books(books: list[Book], num_books: int | None = None,
                 max_chapters: int | None = None, *, min_seconds: float | None = None) -> list[Book]:
    """The first `num_books` books (all when None), each cut to its first `max_chapters` chapters.

    With `min_seconds`, books whose (cut) chapters last less than that in total are skipped before
    counting `num_books` (durations from the file headers: a book reaching e.g. 8000 frames needs
    `min_seconds = 8000 / 12.5`).

    Raises:
        ValueError: `num_books` or `max_chapters` not a positive integer, `min_seconds` negative.
        AudioReadError: with `min_seconds`, a chapter whose duration cannot be read.
    """
    for name, value in (("num_books", num_books), ("max_chapters", max_chapters)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")
    if min_seconds is not None and not (isinstance(min_seconds, (int, float)) and min_seconds >= 0):
        raise ValueError(f"min_seconds: expected a number >= 0 or None, got {min_seconds!r}")
    chosen: list[Book] = []
    for b in books:
        if num_books is not None and len(chosen) >= num_books:
            break
        cut = Book(b.speaker, b.book, list(b.chapters if max_chapters is None else b.chapters[:max_chapters]))
        if min_seconds is not None and book_seconds(cut) < min_seconds:
            continue
        chosen.append(cut)
    return chosen


def _sinc_filters(up: int, down: int, zeros: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filters `[K, up]` (float32) and their half width `width` (input samples).

    Output frame k, phase p is the input at time `k * down + p * down / up`; its filter reads the input
    samples `k * down - width + j`, j in [0, K), with K = 2 * width + down + 1 covering every phase.
    """
    cutoff = min(1.0, up / down) * rolloff  # as a fraction of the input Nyquist frequency
    width = math.ceil(zeros / cutoff)
    taps = torch.arange(-width, width + down + 1, dtype=torch.float64)
    offsets = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    t = taps[None, :] - offsets
    window = torch.where(t.abs() <= width, torch.cos(math.pi * t / (2 * width)) ** 2, torch.zeros_like(t))
    filters = cutoff * torch.special.sinc(cutoff * t) * window
    return filters.t().contiguous().float(), width


# The polyphase filter bank has `up` phases of about `2 * width + down` taps: small for the common rates
# (16 kHz: 3 x 57, 22.05 and 44.1 kHz: 160 x 200 and 80 x 240, 48 kHz: 1 x 53) but quadratic in the reduced
# ratio (22,051 Hz: 24,000 x 22,104 taps, 2 GB, and as much again for the conv weight). Past these bounds
# each output sample's taps are computed on the fly instead (`_resample_direct`), a block at a time.
POLYPHASE_MAX_PHASES = 320
POLYPHASE_MAX_TAPS = 1 << 22     # phases x taps of the filter bank (16 MB as float32)
DIRECT_BLOCK_VALUES = 1 << 21    # output samples x taps per block of `_resample_direct` (8 MB as float32)
DIRECT_BANK_VALUES = 1 << 24     # phases x taps of `_resample_direct`'s precomputed taps (64 MB as float32)


def _resample_plan(src_rate: int, dst_rate: int) -> tuple[int, int, int, str]:
    """`(up, down, width, method)` for resampling `src_rate` -> `dst_rate`: the reduced ratio, the filter's
    half width in input samples, and "polyphase" (filter bank + conv) or "direct" (taps per output sample)."""
    g = math.gcd(int(src_rate), int(dst_rate))
    up, down = int(dst_rate) // g, int(src_rate) // g
    width = math.ceil(_ZEROS / (min(1.0, up / down) * _ROLLOFF))
    taps = 2 * width + down + 1
    method = "polyphase" if up <= POLYPHASE_MAX_PHASES and up * taps <= POLYPHASE_MAX_TAPS else "direct"
    return up, down, width, method


_ZEROS, _ROLLOFF = 24, 0.945


def resample(wav: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling of `wav` `[T]` float32 from `src_rate` to `dst_rate`: `[ceil(T * dst / src)]`.

    No delay: output sample n is the input interpolated at time n / dst_rate. Anti-aliasing lowpass at
    0.945 of the lower Nyquist frequency (Hann-windowed sinc, 24 zero crossings). Zero padding at the ends.
    Memory is bounded whatever the rates (`_resample_plan`): a polyphase filter bank for ratios with few
    phases (every common rate), the same filter evaluated per output sample otherwise.
    """
    if wav.ndim != 1:
        raise ValueError(f"wav: expected a 1-D array [T], got shape {wav.shape}")
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be positive, got src_rate={src_rate}, dst_rate={dst_rate}")
    up, down, width, method = _resample_plan(src_rate, dst_rate)
    if up == down:
        return wav.astype(np.float32, copy=False)
    if method == "direct":
        return _resample_direct(wav, up, down, width)
    length = wav.shape[0]
    out_len = -(-length * up // down)
    frames = -(-out_len // up)
    filters, width = _sinc_filters(up, down, zeros=_ZEROS, rolloff=_ROLLOFF)
    # Polyphase as a plain conv: input sample k * down + r goes to channel r, position k, so that each
    # output frame k is conv1d(in=down channels, out=up phases, kernel=kq) at position k (stride 1).
    kq = -(-filters.shape[0] // down)
    weight = torch.nn.functional.pad(filters, (0, 0, 0, kq * down - filters.shape[0]))  # [kq*down, up]
    weight = weight.reshape(kq, down, up).permute(2, 1, 0).contiguous()  # [up, down, kq]
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    total = (frames + kq - 1) * down
    x = torch.nn.functional.pad(x, (width, max(0, total - width - length)))[:total]
    x = x.reshape(frames + kq - 1, down).t()  # [down, frames + kq - 1]
    out = torch.empty(frames, up, dtype=torch.float32)
    block = 1 << 18  # output frames per conv call: bounded memory on hour-long files
    for start in range(0, frames, block):
        stop = min(frames, start + block)
        y = torch.nn.functional.conv1d(x[None, :, start: stop + kq - 1], weight)  # [1, up, n]
        out[start:stop] = y[0].t()
    return out.reshape(-1)[:out_len].numpy()


def _direct_taps(t: torch.Tensor, width: int, cutoff: float) -> torch.Tensor:
    """The windowed sinc of `_sinc_filters` at times `t` (input samples from the output sample's time)."""
    window = torch.where(t.abs() <= width, torch.cos(math.pi * t / (2 * width)) ** 2, torch.zeros_like(t))
    return cutoff * torch.special.sinc(cutoff * t) * window


def _resample_direct(wav: np.ndarray, up: int, down: int, width: int) -> np.ndarray:
    """`resample` by applying, to each output sample n, the windowed sinc of `_sinc_filters` at the input
    samples around its time n * down / up (`[2 * width + 2]` taps), a block of outputs at a time. The taps
    of the `up` phases are computed once when they fit `DIRECT_BANK_VALUES` (always for 24 kHz output: at
    most 24,000 x 410), else per block."""
    cutoff = min(1.0, up / down) * _ROLLOFF
    length = wav.shape[0]
    out_len = -(-length * up // down)
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    x = torch.nn.functional.pad(x, (width + 1, width + 2))          # input sample i at i + width + 1
    taps = torch.arange(-width, width + 2, dtype=torch.int64)        # [J]
    windows = x.unfold(0, taps.shape[0], 1)                          # [., J] view of the padded input
    bank = None
    if up * taps.shape[0] <= DIRECT_BANK_VALUES:                     # [up, J]: phase p at time p / up
        phases = torch.arange(up, dtype=torch.float64) / up
        bank = _direct_taps(taps[None, :].double() - phases[:, None], width, cutoff).float()
    out = np.empty(out_len, dtype=np.float32)
    block = max(1, DIRECT_BLOCK_VALUES // taps.shape[0])
    for start in range(0, out_len, block):
        n = torch.arange(start, min(out_len, start + block), dtype=torch.int64)
        base = n * down // up                                        # integer part of the time, exact
        phase = n * down % up                                        # fractional part, in 1/up
        if bank is not None:
            h = bank.index_select(0, phase)                          # [B, J]
        else:
            h = _direct_taps(taps[None, :].double() - (phase.double() / up)[:, None], width, cutoff).float()
        values = windows.index_select(0, base + 1)                   # [B, J]: inputs base - width .. base + width + 1
        out[start: start + n.shape[0]] = (h * values).sum(dim=1).numpy()
    return out


def _opus_pre_skip(path: Path) -> int:
    """Pre-skip (samples at 48 kHz) from the OpusHead packet of an Ogg Opus file (RFC 7845, 5.1)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    at = head.find(b"OpusHead")
    if at < 0 or at + 12 > len(head):
        raise AudioReadError(path, "Ogg Opus file without an OpusHead header")
    return int.from_bytes(head[at + 10: at + 12], "little")


def check_audio_file(path: str | Path) -> Path:
    """`path` as a Path; AudioReadError if it is not a regular file (a dangling link says where it points;
    a device, FIFO or socket is named as such: reading one could block or never end)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        if path.is_symlink():
            raise AudioReadError(path, f"dangling symbolic link to {os.readlink(path)}") from None
        raise AudioReadError(path, "no such file") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        target = f" (a link to {os.readlink(path)})" if path.is_symlink() else ""
        raise AudioReadError(path, f"not a regular file: {kind}{target}")
    return path


def read_header(path: str | Path) -> tuple[int, int, float]:
    """`(sample_rate, channels, seconds)` of an audio file from its header (`sphn.FileReader`, nothing decoded),
    after `check_audio_file` (a FIFO or device is refused, never opened).

    Raises:
        AudioReadError: not a regular file, or a header sphn cannot read; names the file.
    """
    path = check_audio_file(path)
    try:
        reader = sphn.FileReader(str(path))
        return int(reader.sample_rate), int(reader.channels), float(reader.duration_sec)
    except Exception as exc:  # sphn raises ValueError with the decoder's message
        raise AudioReadError(path, f"cannot read its header: {exc}") from exc


def read_audio(path: str | Path, sample_rate: int = 24000) -> np.ndarray:
    """Decode `path` with sphn as mono float32 `[T]` at `sample_rate` (channels averaged, resampled).

    Raises:
        AudioReadError: missing, unreadable or corrupt file, or a file with no samples; names the file.
    """
    path = check_audio_file(path)
    try:
        data, src_rate = sphn.read(str(path))
    except Exception as exc:  # sphn raises ValueError/OSError with the decoder's message
        if path.suffix.lower() != ".ogg":
            raise AudioReadError(path, str(exc)) from exc
        try:  # sphn.read handles Ogg Vorbis; Ogg Opus needs sphn.read_opus
            data, src_rate = sphn.read_opus(str(path))
        except Exception as opus_exc:
            raise AudioReadError(path, f"{exc}; as Ogg Opus: {opus_exc}") from opus_exc
        # sphn.read_opus keeps the encoder's pre-skip (priming samples at 48 kHz): drop it, as
        # the Ogg Opus spec asks, so that the audio starts where it was recorded.
        data = np.asarray(data)[..., _opus_pre_skip(path):]
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[-1] == 0:
        raise AudioReadError(path, f"no audio samples (decoded shape {tuple(data.shape)})")
    if not np.isfinite(data).all():
        raise AudioReadError(path, "decoded samples contain NaN or inf")
    # sphn decodes a truncated file, or one with a damaged frame, without error: it just returns fewer
    # samples. The header's duration tells (slack for codecs whose header is approximate, e.g. mp3).
    header_seconds = sphn.durations([str(path)])[0]
    decoded_seconds = data.shape[-1] / src_rate
    if header_seconds is not None and decoded_seconds < header_seconds - TRUNCATION_SLACK_SECONDS:
        raise AudioReadError(path, f"truncated or corrupt: decoded {decoded_seconds:.3f} s of the "
                                   f"{header_seconds:.3f} s its header announces")
    mono = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    return resample(mono, int(src_rate), int(sample_rate))


__all__: tp.Sequence[str] = [
    "AUDIO_EXTENSIONS", "AudioReadError", "Book", "Chapter", "DataError", "check_audio_file", "discover_books",
    "natural_key",
    "read_audio", "read_header", "resample", "select_books", "book_seconds",
]
