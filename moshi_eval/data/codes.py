"""Mimi codes of audiobooks: chunked streaming encoding, silence codes, and an on-disk code cache.

A chapter is encoded with Mimi in streaming mode, `chunk_frames` whole frames at a time, so the encoder's
activations stay bounded on hour-long chapters (one-shot `mimi.encode` attends over the whole chapter).
Streaming Mimi only takes whole frames of `mimi.frame_size` samples (1920 at 24 kHz, 12.5 Hz): the end of
a chapter is padded with zeros to a whole frame, which is also what one-shot `mimi.encode` does, so the
result equals `mimi.encode(wav)` up to float rounding (tests/test_codes.py checks it on a Mimi with spread
codebooks). Rounding can still flip a code where two entries of a residual-quantizer level are nearly tied
(measured on a small Mimi: 7 of 1,120 codes of a chapter, one frame, with chunks of 250 frames; none frame by
frame), so the codes depend on the chunk length: the code cache keys on it. Each chapter starts from a fresh
streaming state; the book's codes are its chapters' codes concatenated.

Why the KV caches are widened: moshi's streaming attention keeps a ring cache of exactly `context` steps,
so a call feeding T > 1 steps overwrites keys that the first queries of the call still need (with T >=
`context` they see almost nothing). Frame-by-frame streaming (2 encoder steps) nearly hides this; chunks
of many frames do not (the latents drift by ~10% in our tests). `encode_audio` therefore gives each
attention layer a cache of `context + steps per call`: the attention mask still limits every query to
`context` steps, so chunked streaming computes what one-shot `mimi.encode` computes (up to rounding).
"""
from contextlib import contextmanager
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import typing as tp

import numpy as np
import torch
from moshi.models.compression import MimiModel
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention
from moshi.utils.compile import no_cuda_graph

from ..files.atomic import atomic_write
from ..data.librilight import AudioReadError, Book, check_audio_file, read_audio
from ..files.hashing import file_sha256

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_FRAMES = 250  # frames per streaming Mimi call when encoding a chapter
# Torch CPU threads while Mimi encodes on a CPU. The codes depend on it (the reductions are split otherwise,
# and a nearly tied residual-quantizer code flips: 8 of 1,184 codes of a 5-s chapter between 1 and 2 threads),
# so it is fixed, whatever --threads the scoring uses, and part of the cache key and of a run's configuration.
ENCODE_THREADS = 1
_CACHE_FORMAT = 2  # bump when the stored layout or the encoding procedure changes (2: codes checksum)


# Frames of silence encoded for the user stream; later user frames repeat the last one. Mimi's encoder attends
# over 250 steps at 25 Hz (10 s = 125 frames): once the warm-up frames are out of that window its input, hence
# its codes, are constant.
SILENCE_FRAMES = 160
MIMI_FRAME_RATE = 12.5   # frames per second, to estimate a file's frames from its header


def _check_codebooks(mimi: MimiModel, num_codebooks: int | None) -> None:
    if num_codebooks is not None and mimi.num_codebooks != num_codebooks:
        raise ValueError(
            f"mimi: expected a codec set to {num_codebooks} codebooks (mimi.set_num_codebooks), "
            f"got {mimi.num_codebooks}")


def codec_identity(mimi: MimiModel) -> str:
    """Stable sha256 hex digest of the codec: class, sample/frame rate, active codebooks, cardinality, and
    every entry of the state dict (name, dtype, shape, bytes). Cache key component: any weight change or
    `set_num_codebooks` gives a new identity. Hashes all weights: ~1 s for the real Mimi on CPU."""
    h = hashlib.sha256()
    header = {
        "format": _CACHE_FORMAT,
        "class": f"{type(mimi).__module__}.{type(mimi).__qualname__}",
        "sample_rate": mimi.sample_rate,
        "frame_rate": mimi.frame_rate,
        "frame_size": mimi.frame_size,
        "num_codebooks": mimi.num_codebooks,
        "cardinality": mimi.cardinality,
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in sorted(mimi.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def device_kind(device: str | torch.device) -> str:
    """What numbers computed on `device` depend on: "cpu", or "cuda (<GPU name>)" (not the index: two
    GPUs of one model compute the same numbers; two models may not)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda ({torch.cuda.get_device_name(index)})"
    return device.type


def encoding_setting(device: str | torch.device, chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> dict:
    """What Mimi's codes depend on besides the audio and the weights: device kind, CPU threads (fixed to
    `ENCODE_THREADS` by `encode_audio`) and chunk length. Part of the code cache's key and of a run's
    configuration, so that codes made under another setting are never mixed in."""
    device = torch.device(device)
    return {"device": device_kind(device), "threads": ENCODE_THREADS if device.type == "cpu" else None,
            "chunk_frames": chunk_frames}


@contextmanager
def _encoding_threads(device: torch.device) -> tp.Iterator[None]:
    """`ENCODE_THREADS` torch threads on a CPU for the duration, the caller's count restored after."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(ENCODE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _widen_kv_caches(model: torch.nn.Module, extra_steps: int) -> None:
    """Inside `model.streaming(...)`: replace each self-attention ring cache of capacity `context` with an
    empty one of capacity `context + extra_steps`, so a call of up to `extra_steps` steps loses no key
    within the context. Must run before the first call (the caches are empty then)."""
    for name, module in model.named_modules():
        if not isinstance(module, StreamingMultiheadAttention) or module.cross_attention:
            continue
        state = module._streaming_state
        cache = getattr(state, "kv_cache", None)
        if module.context is None or cache is None:
            continue
        if not isinstance(cache, RingKVCache) or int(cache.end_offset.max()) != 0:
            raise RuntimeError(f"{name}: unexpected streaming KV cache {type(cache).__name__} "
                               "(moshi internals changed?): cannot widen it for chunked encoding")
        _, batch, heads, _, dim_per_head = cache.cache.shape
        state.kv_cache = RingKVCache(batch, heads, dim_per_head, module.context + extra_steps,
                                     respect_exec_mask=cache.respect_exec_mask,
                                     device=cache.cache.device, dtype=cache.cache.dtype)


@torch.no_grad()
def encode_audio(mimi: MimiModel, wav: np.ndarray, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                 num_codebooks: int | None = None) -> torch.Tensor:
    """Mimi codes `[n_q, T]` int64 on CPU of `wav` `[S]` float32 mono at `mimi.sample_rate`.

    T = ceil(S / frame_size): the last frame is zero padded. Streaming Mimi, `chunk_frames` frames per
    call, `ENCODE_THREADS` torch threads on a CPU (the codes depend on the thread count); equal to one-shot
    `mimi.encode(wav[None, None])` up to float rounding (which can flip a nearly tied residual-quantizer code).
    `mimi` must not be streaming already.

    Args:
        num_codebooks: when given, raise ValueError unless `mimi.num_codebooks` equals it (the LM expects
            8 for Moshi: whoever builds Mimi must call `mimi.set_num_codebooks(8)`).
    """
    wav = np.asarray(wav)
    if wav.ndim != 1 or wav.shape[0] == 0:
        raise ValueError(f"wav: expected a non-empty 1-D array [samples], got shape {wav.shape}")
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"wav: expected float samples, got dtype {wav.dtype}")
    if not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise ValueError(f"chunk_frames: expected a positive integer, got {chunk_frames!r}")
    _check_codebooks(mimi, num_codebooks)
    if mimi.is_streaming:
        raise RuntimeError("mimi is already in streaming mode: encode_audio needs a fresh streaming state")
    frame = mimi.frame_size
    frames = -(-wav.shape[0] // frame)
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    x = torch.nn.functional.pad(x, (0, frames * frame - wav.shape[0]))
    device = next(mimi.parameters()).device
    dtype = next(mimi.parameters()).dtype
    chunk_frames = min(chunk_frames, frames)  # the caches are sized by it: no larger than needed
    chunk = chunk_frames * frame
    out: list[torch.Tensor] = []
    steps_per_frame = math.ceil(getattr(mimi, "encoder_frame_rate", mimi.frame_rate) / mimi.frame_rate)
    # No CUDA graphs: they need every call to have the same shape (the last chunk is shorter), and
    # chunks of many frames amortize the launch overhead they would save anyway.
    with no_cuda_graph(), _encoding_threads(torch.device(device)), mimi.streaming(1):
        _widen_kv_caches(mimi, chunk_frames * steps_per_frame)
        for start in range(0, x.shape[0], chunk):
            piece = x[start: start + chunk].to(device=device, dtype=dtype)[None, None]
            out.append(mimi.encode(piece)[0].to("cpu", torch.int64))
    codes = torch.cat(out, dim=-1)
    assert codes.shape[-1] == frames, (codes.shape, frames)  # internal invariant, not a user error
    return codes


def silence_codes(mimi: MimiModel, frames: int, chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> torch.Tensor:
    """Mimi codes `[n_q, frames]` int64 of `frames` frames of digital silence (zeros) from a fresh state.

    The first frames differ from the steady state (causal convolutions warming up), like the start of a
    real silent user stream."""
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames: expected a positive integer, got {frames!r}")
    return encode_audio(mimi, np.zeros(frames * mimi.frame_size, dtype=np.float32), chunk_frames)


class CodeCache:
    """On-disk cache of a chapter's Mimi codes, keyed on the audio file's content and the codec identity.

    Entry: `<root>/<codec_id[:16]>/<sha256(content_sha256 + codec_id)>.pt`, a torch file holding the codes
    and what they were made from. Writes are atomic (temporary file + `os.replace`), so an interrupted
    run never leaves a truncated entry under the final name; an unreadable or mismatching entry counts as
    a miss (with a warning) and is rewritten by the next `put`.

    Attributes:
        hits, misses: counts of `get` calls that found / did not find a valid entry.
    """

    def __init__(self, root: str | Path, codec_id: str) -> None:
        if not codec_id or not isinstance(codec_id, str):
            raise ValueError(f"codec_id: expected a non-empty string, got {codec_id!r}")
        self.root = Path(root)
        self.codec_id = codec_id
        self.hits = 0
        self.misses = 0
        self.disabled = False     # set when writing fails: the run goes on without caching
        # content hash memo: path -> ((size, mtime_ns, inode, ctime_ns), sha256), so get + put hash a file once
        self._hashes: dict[Path, tuple[tuple[int, int, int, int], str]] = {}

    def _content_hash(self, audio_path: Path) -> str:
        path = check_audio_file(audio_path).resolve()
        try:
            st = path.stat()
        except OSError as exc:
            raise AudioReadError(path, f"cannot stat file for the code cache: {exc}") from exc
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)   # ctime: no user call sets it back
        memo = self._hashes.get(path)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        digest = file_sha256(path)
        self._hashes[path] = (stamp, digest)
        return digest

    def entry_path(self, audio_path: Path, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                   setting: dict | None = None) -> Path:
        """Where the codes of `audio_path`, encoded `chunk_frames` frames per call under `setting`
        (`encoding_setting`: device kind, threads), are (or would be) stored."""
        key = f"{self._content_hash(audio_path)}|{self.codec_id}|chunk_frames={chunk_frames}"
        if setting is not None:
            key += "|" + json.dumps(setting, sort_keys=True)
        key = hashlib.sha256(key.encode()).hexdigest()
        return self.root / self.codec_id[:16] / f"{key}.pt"

    def get(self, audio_path: Path, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
            setting: dict | None = None) -> torch.Tensor | None:
        """The cached codes `[n_q, T]` int64 of `audio_path` (encoded in chunks of `chunk_frames` under
        `setting`), or None."""
        entry = self.entry_path(audio_path, chunk_frames, setting)
        if not entry.is_file():
            self.misses += 1
            return None
        try:
            payload = torch.load(entry, map_location="cpu", weights_only=True)
            codes = payload["codes"]
            # The entry must say it holds this very content: a valid entry of another chapter copied (or
            # linked) to this key is a miss, not another chapter's codes.
            ok = (payload.get("codec_id") == self.codec_id and isinstance(codes, torch.Tensor)
                  and payload.get("content_sha256") == self._content_hash(audio_path)
                  and codes.dtype == torch.int64 and codes.dim() == 2 and codes.shape[-1] > 0
                  and payload.get("codes_sha256") == _codes_sha256(codes))
        except Exception as exc:  # corrupt or foreign file: re-encode rather than fail the run
            logger.warning("code cache entry %s unreadable (%s): re-encoding %s", entry, exc, audio_path)
            ok = False
        else:
            if not ok:
                logger.warning("code cache entry %s does not match: re-encoding %s", entry, audio_path)
        if not ok:
            self.misses += 1
            return None
        self.hits += 1
        return codes

    def put(self, audio_path: Path, codes: torch.Tensor, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
            setting: dict | None = None) -> None:
        """Store `codes` `[n_q, T]` int64 for `audio_path` (encoded in chunks of `chunk_frames` under
        `setting`), atomically."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != torch.int64:
            raise ValueError(f"codes: expected an int64 tensor [n_q, T], got "
                             f"{getattr(codes, 'dtype', type(codes))} {tuple(getattr(codes, 'shape', ()))}")
        if self.disabled:
            return
        entry = self.entry_path(audio_path, chunk_frames, setting)
        codes = codes.detach().to("cpu").contiguous()
        payload = {"codes": codes, "codes_sha256": _codes_sha256(codes), "codec_id": self.codec_id,
                   "source": os.fsdecode(audio_path), "content_sha256": self._content_hash(audio_path),
                   "format": _CACHE_FORMAT, "setting": setting}
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(entry, lambda f: torch.save(payload, f))
        except OSError as exc:   # a --cache-dir that is a file, read-only or full: go on without it
            logger.warning("code cache %s unusable (%s): going on without it", self.root, exc)
            self.disabled = True


def _codes_sha256(codes: torch.Tensor) -> str:
    """Checksum of a cache entry's codes: a flipped bit on disk is a miss, not a wrong code."""
    return hashlib.sha256(codes.contiguous().numpy().tobytes()).hexdigest()


def encode_book(mimi: MimiModel, book: Book, cache: CodeCache | None = None,
                chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                num_codebooks: int | None = None,
                on_chapter: tp.Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Codes `[n_q, T]` int64 of a book: each chapter read at `mimi.sample_rate`, encoded from a fresh
    streaming state (or taken from `cache`), concatenated in chapter order.

    Args:
        on_chapter: called as `on_chapter(index, codes)` after each chapter (progress reporting).
    Raises:
        AudioReadError: a chapter file cannot be read; names the file.
    """
    _check_codebooks(mimi, num_codebooks)
    if not book.chapters:
        raise ValueError(f"book: {book.speaker}/{book.book} has no chapters")
    parts: list[torch.Tensor] = []
    setting = encoding_setting(next(mimi.parameters()).device, chunk_frames)
    for index, chapter in enumerate(book.chapters):
        codes = cache.get(chapter.path, chunk_frames, setting) if cache is not None else None
        if codes is not None and codes.shape[0] != mimi.num_codebooks:
            codes = None  # codec_id covers num_codebooks; this is only a guard against a foreign cache
        if codes is None:
            wav = read_audio(chapter.path, mimi.sample_rate)
            codes = encode_audio(mimi, wav, chunk_frames)
            if cache is not None:
                cache.put(chapter.path, codes, chunk_frames, setting)
        parts.append(codes)
        if on_chapter is not None:
            on_chapter(index, codes)
    return torch.cat(parts, dim=-1)


__all__ = ["CodeCache", "ENCODE_THREADS", "codec_identity", "device_kind", "encode_audio", "encode_book",
           "encoding_setting", "file_sha256", "silence_codes"]
