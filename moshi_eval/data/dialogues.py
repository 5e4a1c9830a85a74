"""Two-speaker dialogues in moshi-finetune's data layout, as the code batches `LMModel.forward` takes.

The layout (kyutai-labs/moshi-finetune, its README and `finetune/data/`):
- a jsonl manifest, one `{"path": ..., "duration": seconds}` per line; a relative path is relative to the folder
  of the jsonl (symbolic links of the jsonl resolved, as sphn does); other keys are ignored;
- stereo audio files: the left channel (0) is the model's speech, the right channel (1) the user's;
- beside each audio file, `<stem>.json` = `{"alignments": [[word, [start_s, end_s], speaker], ...]}`, word times
  in seconds from the start of the file, sorted by start.

Each item is a window of `duration` seconds, cut as moshi-finetune's eval loader cuts them (sphn's sequential
`dataset_jsonl(..., pad_last_segment=True)`): windows start at 0, D, 2D, ... while `start + D < duration` of the
jsonl entry, then one last partial window if `start < duration`; `duration=None` takes each file whole. An item
is the codes `[1 + 2 K, T]` (K = Mimi's codebooks, T = ceil(D * 12.5), or the file's frames when whole):
- row 0: the text stream built from the words of speaker `SPEAKER_MAIN` that start inside the window
  (`build_text_stream`: a word's tokens from frame floor(12.5 * start), a word due while the previous one still has
  tokens pending replaces them, the end-of-padding id on the padding frame before a word's first token);
- rows 1 .. K: Mimi codes of the left channel (the model), rows K + 1 .. 2 K: of the right channel (the user),
  each channel of each window encoded from a fresh state, `-1` past the window's real audio.
Batches are consecutive items, padded with -1 to the longest.

Where this follows moshi-finetune exactly, and where it cannot (docs/dialogues.md has the details):
- the text length quirk of its `InterleavedTokenizer` (the text of a partial window is built over
  ceil(12.5 * n) frames for n audio frames, then cut to T: text targets past the real audio) is reproduced with
  `text_length="finetune"` (the default); `text_length="audio"` builds it over the n audio frames, -1 after;
- audio is decoded with sphn and resampled to 24 kHz with `librilight.resample` over the whole file (moshi-finetune:
  rubato per window), and encoded with streaming Mimi (`codes.encode_audio`; moshi-finetune: one-shot
  `mimi.encode`): the codes agree up to float rounding;
- its trailing incomplete batch is dropped (`drop_last=True`) and its eval reads at most 40 batches
  (`max_batches=40`); the defaults here score every window;
- a window past the real end of the audio (a jsonl duration longer than the file) has no audio: its row is all -1,
  as in moshi-finetune, and the evaluator leaves it out (it has no target);
- bad data is an error naming the file (moshi-finetune crashes at the model's codebook count on a mono file, and
  silently cuts wrong windows from unsorted alignments).
"""
from collections import deque
from dataclasses import dataclass
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import time
import typing as tp

import numpy as np
import sphn
import torch

from ..config import DEFAULT_DURATION, TEXT_LENGTHS, choice, positive_float, positive_int
from ..files.hashing import FileHasher
from .codes import CodeCache, codec_identity, encode_audio, encoding_setting
from .librilight import TRUNCATION_SLACK_SECONDS, AudioReadError, DataError, check_audio_file, resample

logger = logging.getLogger(__name__)

FRAME_RATE = 12.5                 # Mimi frames per second
SAMPLE_RATE = 24000               # Mimi's sample rate
TEXT_PADDING_ID = 3               # moshi-finetune's Interleaver(text_padding=3): Moshi's text padding id
END_OF_PADDING_ID = 0             # Interleaver(end_of_text_padding=0): Moshi's end-of-padding id
MAIN_SPEAKER = "SPEAKER_MAIN"     # the only speaker whose words are kept (keep_main_only=True)
# A word may end a little after the audio (aligners round up); one that starts after it, or ends this much later,
# belongs to another file.
ALIGNMENT_SLACK_SECONDS = 0.5


# --- the manifest and the windows --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DialogueFile:
    """One line of the jsonl: the resolved audio path and the duration it declares (trusted to cut windows)."""
    path: Path
    duration: float
    line: int                     # 1-based line number in the jsonl, for messages


@dataclass(frozen=True)
class Window:
    """One item: `duration` seconds of `file` from `start` (None: the whole file)."""
    file: DialogueFile
    start: float                  # seconds; float32-rounded as sphn stores it
    duration: float | None

    @property
    def frames(self) -> int:
        """T: frames of the item (for a whole file, from the jsonl duration: an estimate until it is read)."""
        return math.ceil((self.file.duration if self.duration is None else self.duration) * FRAME_RATE)

    def describe(self) -> dict:
        return {"path": os.fsdecode(self.file.path), "start": self.start, "duration": self.duration}


def read_manifest(jsonl: str | Path) -> list[DialogueFile]:
    """The entries of a moshi-finetune jsonl, paths resolved against the jsonl's folder.

    Raises:
        DataError: the jsonl is missing or empty, or a line is not a JSON object with a string `path` and a
            non-negative number `duration`; names the file and line.
    """
    jsonl = Path(jsonl)
    try:
        text = jsonl.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"jsonl {jsonl}: cannot read it ({exc}).") from exc
    base = jsonl.resolve().parent        # sphn canonicalises the jsonl path: links resolved
    files = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{jsonl}:{number}: expected a JSON object {{\"path\", \"duration\"}}, got invalid "
                            f"JSON ({exc}).") from exc
        path, duration = (entry.get("path"), entry.get("duration")) if isinstance(entry, dict) else (None, None)
        if not isinstance(path, str) or not path:
            raise DataError(f"{jsonl}:{number}: expected a string \"path\", got {line.strip()[:120]!r}.")
        if not isinstance(duration, (int, float)) or isinstance(duration, bool) or not 0 <= duration < math.inf:
            raise DataError(f"{jsonl}:{number}: expected a \"duration\" in seconds (a number >= 0), got "
                            f"{duration!r}.")
        files.append(DialogueFile(base / path, float(duration), number))    # an absolute path stays as it is
    if not files:
        raise DataError(f"jsonl {jsonl} lists no file.")
    return files


def plan_windows(files: tp.Sequence[DialogueFile], duration: float | None) -> list[Window]:
    """The windows of moshi-finetune's sequential eval loader, in jsonl order (whole files when `duration` is None).

    Full windows while `start + D < file duration`, then the last partial one if `start < file duration`
    (`pad_last_segment=True`): a file of exactly k D seconds gives k windows, one of 0 s gives none."""
    windows = []
    for f in files:
        if duration is None:
            if f.duration > 0:
                windows.append(Window(f, 0.0, None))
            continue
        start = 0.0
        while start + duration < f.duration:
            windows.append(Window(f, float(np.float32(start)), duration))
            start += duration
        if start < f.duration:
            windows.append(Window(f, float(np.float32(start)), duration))
    return windows


# --- alignments and the text stream ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Word:
    """One aligned word: times in seconds (from the file's start in `read_alignments`, from the window's start
    after `select_words`)."""
    text: str
    start: float
    end: float
    speaker: str


def alignment_path(audio_path: Path) -> Path:
    """`a/b.wav` -> `a/b.json` (moshi-finetune: `os.path.splitext(path)[0] + ".json"`)."""
    return Path(os.path.splitext(os.fsdecode(audio_path))[0] + ".json")


def read_alignments(audio_path: Path, audio_seconds: float | None = None) -> list[Word]:
    """The words of the `.json` beside `audio_path`, checked: sorted by start and, given the audio's length in
    seconds, none starting after its end or ending more than `ALIGNMENT_SLACK_SECONDS` after it.

    Raises:
        DataError: the file is missing or unreadable, has no `alignments` list, an entry is not
            `[word, [start, end], speaker]`, the words are not sorted, or one lies past the audio; names the file.
    """
    path = alignment_path(audio_path)
    if not path.is_file():
        raise DataError(f"{audio_path}: its word alignments {path} do not exist (moshi-finetune's layout needs a "
                        "<stem>.json beside each audio file: {\"alignments\": [[word, [start, end], speaker], ...]}).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"alignments {path}: cannot read it as JSON ({exc}).") from exc
    entries = data.get("alignments") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"alignments {path}: expected a JSON object with an \"alignments\" list, got "
                        f"{type(data).__name__}{' without it' if isinstance(data, dict) else ''}.")
    words = []
    for i, entry in enumerate(entries):
        try:
            text, (start, end), speaker = entry
            ok = (isinstance(text, str) and isinstance(speaker, str)
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                          for v in (start, end)))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"alignments {path}: entry {i}: expected [word, [start, end], speaker] (seconds), got "
                            f"{json.dumps(entry)[:120]}.")
        words.append(Word(text, float(start), float(end), speaker))
    for i in range(1, len(words)):
        # moshi-finetune binary-searches the raw list: unsorted words would silently give wrong windows.
        if words[i].start < words[i - 1].start:
            raise DataError(f"alignments {path}: entry {i} starts at {words[i].start} s, before entry {i - 1} "
                            f"({words[i - 1].start} s): the words must be sorted by start time.")
    if audio_seconds is not None:
        for i, w in enumerate(words):
            if w.start >= audio_seconds or w.end > audio_seconds + ALIGNMENT_SLACK_SECONDS:
                raise DataError(f"alignments {path}: entry {i} ({w.text.strip()!r} at {w.start} - {w.end} s) lies "
                                f"past the end of {audio_path} ({audio_seconds:.3f} s of audio): the alignments "
                                "belong to another file, or the audio is truncated.")
    return words


def select_words(words: tp.Sequence[Word], start: float, duration: float | None) -> list[Word]:
    """The words of a window, times relative to its start: those with `start <= word.start < start + duration`
    (a word that began before the window is dropped, one that ends after it is kept), speaker `SPEAKER_MAIN` only,
    zero or negative durations dropped: moshi-finetune's selection and `prepare_item` filters."""
    stop = math.inf if duration is None else start + duration
    chosen = [Word(w.text, w.start - start, w.end - start, w.speaker) for w in words if start <= w.start < stop]
    chosen.sort(key=lambda w: w.start)
    return [w for w in chosen if w.speaker == MAIN_SPEAKER and w.start < w.end]


def word_tokens(tokenizer: tp.Any, text: str) -> list[int]:
    """The tokens of one word: `tokenizer.encode(word.strip())`, lines joined with the newline piece (as
    moshi-finetune's `tokenize`, no BOS; sentencepiece's own dummy prefix gives the leading `▁`)."""
    text = text.strip()
    if not text:
        return []
    lines = text.split("\n")
    pieces = tokenizer.encode(lines)
    if len(lines) == 1:
        return list(pieces[0])
    newline = tokenizer.encode("\n")[-1]
    out: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            out.append(newline)
        out.extend(piece)
    return out


def build_text_stream(words: tp.Sequence[tuple[float, float, tp.Sequence[int]]], num_frames: int,
                      padding_id: int = TEXT_PADDING_ID, end_of_padding_id: int = END_OF_PADDING_ID,
                      frame_rate: float = FRAME_RATE) -> list[int]:
    """The text tokens of `num_frames` frames from `(start_s, end_s, tokens)` words sorted by start.

    moshi-finetune's `Interleaver.build_token_stream` with its training options (in-word padding = padding, no
    keep-and-shift, no BOS/EOS): at each frame t, every word with `start * frame_rate < t + 1` becomes due and
    replaces the pending tokens (only the last of several due together is kept); a pending token is written at t,
    and when frame t - 1 holds padding it becomes `end_of_padding_id`. Other frames are padding. Tokens that would
    fall past the end are lost.
    """
    out = [padding_id] * num_frames
    pending: deque[int] = deque()
    i = 0
    for t in range(num_frames):
        while i < len(words) and words[i][0] * frame_rate < t + 1:
            pending = deque(words[i][2])      # replace, not append: leftovers of the previous word are dropped
            i += 1
        if pending:
            # The value is compared, not where it came from (as moshi-finetune): a token equal to the padding id
            # is marked too.
            if t > 0 and out[t - 1] == padding_id:
                out[t - 1] = end_of_padding_id
            out[t] = pending.popleft()
    return out


def window_text(words: tp.Sequence[Word], tokenizer: tp.Any, audio_frames: int, frames: int, text_length: str,
                padding_id: int = TEXT_PADDING_ID, end_of_padding_id: int = END_OF_PADDING_ID) -> torch.Tensor:
    """Row 0 of an item `[T = frames]` int64 from its window's words (relative times, `select_words`).

    `text_length="finetune"`: built over ceil(12.5 * audio_frames) frames and cut or padded with -1 to T, as
    moshi-finetune's `InterleavedTokenizer` (it passes a frame count where a duration is expected: full windows are
    unaffected, a partial window has text targets past its audio). `"audio"`: built over the audio frames, -1 after.
    """
    built = math.ceil(audio_frames * FRAME_RATE) if text_length == "finetune" else audio_frames
    # The stream is causal, except that a token at frame t marks frame t - 1: T + 1 frames give the first T exactly,
    # without building the ~12.5 T frames the quirk asks for.
    n = min(built, frames + 1)
    tokens = [(w.start, w.end, word_tokens(tokenizer, w.text)) for w in words]
    stream = build_text_stream(tokens, n, padding_id, end_of_padding_id)[:frames]
    row = torch.full((frames,), -1, dtype=torch.long)
    row[:len(stream)] = torch.tensor(stream, dtype=torch.long)
    return row


# --- audio -------------------------------------------------------------------------------------------------------

def read_stereo(path: str | Path, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, float]:
    """Decode a stereo file as float32 `[2, S]` at `sample_rate` (each channel resampled as `librilight.resample`:
    `read_audio` would average the channels) and its length in seconds.

    Raises:
        AudioReadError: missing, unreadable, truncated or empty file; DataError: not two channels. Both name it.
    """
    path = check_audio_file(path)
    try:
        data, src_rate = sphn.read(str(path))
    except Exception as exc:     # sphn raises ValueError/OSError with the decoder's message
        raise AudioReadError(path, str(exc)) from exc
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim != 2 or data.shape[-1] == 0:
        raise AudioReadError(path, f"no audio samples (decoded shape {tuple(data.shape)})")
    if data.shape[0] != 2:
        raise DataError(f"{path}: expected a stereo file (left channel: the model's speech, right: the user's, "
                        f"moshi-finetune's layout), got {data.shape[0]} channel(s).")
    if not np.isfinite(data).all():
        raise AudioReadError(path, "decoded samples contain NaN or inf")
    seconds = data.shape[-1] / src_rate
    header = sphn.durations([str(path)])[0]
    if header is not None and seconds < header - TRUNCATION_SLACK_SECONDS:
        raise AudioReadError(path, f"truncated or corrupt: decoded {seconds:.3f} s of the {header:.3f} s its header "
                                   "announces")
    return np.stack([resample(c, int(src_rate), int(sample_rate)) for c in data]), seconds


# --- items and batches -------------------------------------------------------------------------------------------

@dataclass
class _Audio:
    """A file decoded once for all its windows."""
    path: Path
    wav: np.ndarray               # [2, S] at 24 kHz
    seconds: float                # length at the source rate
    words: list[Word]


class DialogueBatches(tp.Sequence[torch.Tensor]):
    """The batches of a moshi-finetune jsonl, encoded when first indexed: `batches[i]` is `[B, 1 + 2 K, T]` int64 on
    the CPU (K = `mimi.num_codebooks`), `-1` where a stream has no token. What `DialogueEvaluator` takes; under
    torch.distributed each rank then encodes only the batches it scores.

    Args:
        jsonl: the manifest (`read_manifest`).
        mimi: the codec of the model (8 codebooks for Moshi); not streaming.
        tokenizer: the model's sentencepiece processor (`encode(str | list[str])`).
        duration: window length in seconds (None: whole files, padded to the longest of the batch).
        batch_size: consecutive windows per batch.
        text_length: "finetune" (its text length quirk, see `window_text`) or "audio".
        drop_last: drop a trailing batch smaller than `batch_size` (moshi-finetune does).
        max_batches: the first N batches only (moshi-finetune's eval: 40 // world size).
        cache_dir: the Mimi code cache (None: none), keyed on the file's content, the window and the channel.
        keep: keep encoded batches in memory (a second call of the evaluator does not encode again).
        hasher: content hashes of the audio files (`unit_identity`).
    Raises:
        ConfigError: a bad option; DataError: a bad jsonl (at construction), or a bad file (when its batch is
        encoded; names the file).
    """

    def __init__(self, jsonl: str | Path, mimi: tp.Any, tokenizer: tp.Any, *,
                 duration: float | None = DEFAULT_DURATION, batch_size: int = 1, text_length: str = "finetune",
                 drop_last: bool = False, max_batches: int | None = None, cache_dir: str | Path | None = None,
                 keep: bool = True, text_padding_id: int = TEXT_PADDING_ID,
                 end_of_padding_id: int = END_OF_PADDING_ID, hasher: FileHasher | None = None) -> None:
        if duration is not None:
            duration = positive_float("duration", duration)
        positive_int("batch_size", batch_size)
        positive_int("max_batches", max_batches, optional=True)
        choice("text_length", text_length, TEXT_LENGTHS)
        self.jsonl = Path(jsonl)
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.duration = duration
        self.batch_size = batch_size
        self.text_length = text_length
        self.drop_last = drop_last
        self.max_batches = max_batches
        self.text_padding_id = text_padding_id
        self.end_of_padding_id = end_of_padding_id
        self.keep = keep
        self.hasher = hasher or FileHasher()
        self.windows = plan_windows(read_manifest(self.jsonl), duration)
        groups = [self.windows[i:i + batch_size] for i in range(0, len(self.windows), batch_size)]
        if drop_last and groups and len(groups[-1]) < batch_size:
            groups.pop()
        if max_batches is not None:
            groups = groups[:max_batches]
        if not groups:
            raise DataError(f"jsonl {self.jsonl}: no window to score ({len(self.windows)} window(s) of "
                            f"{duration} s, batch_size {batch_size}{', drop_last' if drop_last else ''}).")
        self.groups: list[list[Window]] = groups
        self.cache = None if cache_dir is None else CodeCache(cache_dir, codec_identity(mimi))
        self._encoded: dict[int, torch.Tensor] = {}
        self._last: _Audio | None = None       # consecutive windows mostly share a file: decode it once
        self.encode_seconds = 0.0

    def __len__(self) -> int:
        return len(self.groups)

    @tp.overload
    def __getitem__(self, index: int) -> torch.Tensor: ...
    @tp.overload  # noqa: E301
    def __getitem__(self, index: slice) -> tp.Sequence[torch.Tensor]: ...

    def __getitem__(self, index):  # noqa: E301
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"DialogueBatches indices must be integers, got {type(index).__name__}.")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: {len(self)} batches.")
        done = self._encoded.get(index)
        if done is None:
            start = time.perf_counter()
            done = self._encode(self.groups[index])
            self.encode_seconds += time.perf_counter() - start
            if self.keep:
                self._encoded[index] = done
        return done

    def batch_shape(self, index: int) -> tuple[int, int]:
        """`(B, T)` of batch `index` from the jsonl alone (the cost to share batches over ranks)."""
        group = self.groups[index]
        return len(group), max(w.frames for w in group)

    def unit_identity(self, index: int) -> list[dict]:
        """What batch `index`'s numbers depend on in the data: its windows and their files' content identity."""
        out = []
        for w in self.groups[index]:
            entry = w.describe()
            for name, path in (("audio", w.file.path), ("alignments", alignment_path(w.file.path))):
                try:
                    entry[name] = self.hasher.identity(path)["sha256"]
                except OSError as exc:
                    entry[name] = f"unreadable: {exc}"
            out.append(entry)
        return out

    def identity(self) -> dict:
        """What every batch depends on besides the files: the options, the tokenizer and the codec."""
        proto = getattr(self.tokenizer, "serialized_model_proto", None)
        return {"jsonl": os.fsdecode(self.jsonl.resolve()), "duration": self.duration, "batch_size": self.batch_size,
                "text_length": self.text_length, "drop_last": self.drop_last, "max_batches": self.max_batches,
                "batches": len(self), "windows": sum(len(g) for g in self.groups),
                "tokenizer_sha256": hashlib.sha256(proto()).hexdigest() if callable(proto) else None,
                "text_padding_id": self.text_padding_id, "end_of_padding_id": self.end_of_padding_id}

    def _audio(self, f: DialogueFile) -> _Audio:
        if self._last is not None and self._last.path == f.path:
            return self._last
        wav, seconds = read_stereo(f.path, self.mimi.sample_rate)
        self._last = _Audio(f.path, wav, seconds, read_alignments(f.path, seconds))
        return self._last

    def _encode(self, group: tp.Sequence[Window]) -> torch.Tensor:
        items = [self.item(w) for w in group]
        T = max(int(item.shape[-1]) for item in items)
        batch = torch.full((len(items), items[0].shape[0], T), -1, dtype=torch.long)
        for b, item in enumerate(items):
            batch[b, :, :item.shape[-1]] = item
        return batch

    def item(self, window: Window) -> torch.Tensor:
        """The codes `[1 + 2 K, T]` of one window (see the module docstring)."""
        audio = self._audio(window.file)
        rate = self.mimi.sample_rate
        frame_size = self.mimi.frame_size
        begin = round(window.start * rate)
        if window.duration is None:
            wav = audio.wav
            frames = math.ceil(wav.shape[-1] / frame_size)
        else:
            wav = audio.wav[:, begin: begin + round(window.duration * rate)]
            frames = window.frames
        K = self.mimi.num_codebooks
        codes = torch.full((1 + 2 * K, frames), -1, dtype=torch.long)
        if wav.shape[-1] == 0:
            # A jsonl duration longer than the file: moshi-finetune gets an all -1 item too (no target).
            logger.warning("%s: window at %.2f s starts past the end of its %.2f s of audio (jsonl line %d declares "
                           "%.2f s): it has no audio and is not scored", window.file.path, window.start, audio.seconds,
                           window.file.line, window.file.duration)
            return codes
        n = 0
        for channel in range(2):
            c = self._channel_codes(window, channel, wav[channel])[:, :frames]
            n = int(c.shape[-1])
            codes[1 + channel * K: 1 + (channel + 1) * K, :n] = c
        words = select_words(audio.words, window.start, window.duration)
        codes[0] = window_text(words, self.tokenizer, n, frames, self.text_length, self.text_padding_id,
                               self.end_of_padding_id)
        return codes

    def _channel_codes(self, window: Window, channel: int, wav: np.ndarray) -> torch.Tensor:
        """Mimi codes `[K, n]` of one channel of a window, from a fresh state (or the code cache)."""
        setting = None
        if self.cache is not None:
            setting = {**encoding_setting(next(self.mimi.parameters()).device), "window": [window.start,
                       window.duration], "channel": channel}
            hit = self.cache.get(window.file.path, setting=setting)
            if hit is not None:
                return hit
        codes = encode_audio(self.mimi, np.ascontiguousarray(wav))
        if self.cache is not None:
            self.cache.put(window.file.path, codes, setting=setting)
        return codes


def load_dialogues(jsonl: str | Path, mimi: tp.Any, tokenizer: tp.Any, **kwargs: tp.Any) -> list[torch.Tensor]:
    """Every batch of `DialogueBatches(jsonl, mimi, tokenizer, **kwargs)`, encoded now: `[B, 1 + 2 K, T]` each."""
    batches = DialogueBatches(jsonl, mimi, tokenizer, keep=False, **kwargs)
    return [batches[i] for i in range(len(batches))]


__all__ = ["ALIGNMENT_SLACK_SECONDS", "DEFAULT_DURATION", "DialogueBatches", "DialogueFile", "END_OF_PADDING_ID",
           "FRAME_RATE", "MAIN_SPEAKER", "TEXT_LENGTHS", "TEXT_PADDING_ID", "Window", "Word", "alignment_path",
           "build_text_stream", "load_dialogues", "plan_windows", "read_alignments", "read_manifest", "read_stereo",
           "select_words", "window_text", "word_tokens"]
