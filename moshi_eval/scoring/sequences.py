"""Per-frame audio cross-entropy of a streaming Moshi model on teacher-forced audio.

The codes of a sequence go in the model's own audio stream, teacher forced through
`moshi_patch.teacher_force` (`LMGen.step_with_logits`, `chunk` frames per call: the same losses as one frame
per call), so the loss is that of the model *in its streaming state*: KV cache and any stateful layer (TTT)
as they are after the frames before. Nothing but per-frame losses is kept: memory does not grow with the
number of frames.

`moshi_patch.driver` holds the teacher-forcing rule (frame `s` forced at step `s`, user frame `s - 1`,
`max_delay` flush steps): after the end of a sequence its audio is forced to the zero token (-1, "no
input"), what `LMModel.forward` sees for codes padded with -1, and those frames are never scored. With
`max_frames`, the frames after the kept ones still feed the flush, so the kept frames are scored as in the
full sequence.
"""
from contextlib import ExitStack
from dataclasses import dataclass
import typing as tp

import numpy as np
from moshi.utils.compile import no_compile
from moshi_patch.driver import TEXT_MODES, ForcedChunk, batch_codes, teacher_force
import torch
from tqdm import tqdm

from ..errors import MoshiEvalError
from ..scoring.loss import DEFAULT_FIRST_CODEBOOK_WEIGHT, audio_cross_entropy, codebook_weights

USER_STREAMS = ("silence", "zero")
# Frames per `step_with_logits` call. bench/chunk_scoring.py, Moshi-shaped 118M model, CPU, 2 threads, 512
# frames, text forced: 64 frames per call score 19.7x faster than one, 128 frames 22x, 256 no faster; the
# chunk's logits stay small ([B, 8, 128, 2048] audio, [B, 128, 32000] text).
DEFAULT_CHUNK = 128


class NonFiniteLossError(MoshiEvalError, RuntimeError):
    """Non-finite logits or cross-entropy at a scored frame; the message names the sequence and frame."""

    def __init__(self, message: str, sequence_id: str, frame: int) -> None:
        super().__init__(message)
        self.sequence_id = sequence_id
        self.frame = frame


@dataclass
class FrameLoss:
    """Losses of one frame for every sequence of the batch (CPU tensors)."""
    frame: int                        # frame index t (0-based): predicted from frames [0, t)
    valid: torch.Tensor               # [B] bool: t < length of the sequence; other entries are NaN / -1
    codebook_ce: torch.Tensor         # [B, K] float32
    audio_ce: torch.Tensor            # [B] float32
    audio_ce_weighted: torch.Tensor   # [B] float32
    text_token: torch.Tensor          # [B] int64: the text token of frame t (predicted or forced)


@dataclass
class ChunkLoss:
    """Losses of frames `start .. start + n - 1` for every sequence of the batch (CPU tensors)."""
    start: int                        # first frame (0-based)
    valid: torch.Tensor               # [B, n] bool: frame < length of the sequence; other entries NaN / -1
    codebook_ce: torch.Tensor         # [B, K, n] float32
    audio_ce: torch.Tensor            # [B, n] float32
    audio_ce_weighted: torch.Tensor   # [B, n] float32
    text_token: torch.Tensor          # [B, n] int64: the text token of each frame (predicted or forced)

    def frames(self) -> tp.Iterator[FrameLoss]:
        for t in range(self.valid.shape[1]):
            yield FrameLoss(frame=self.start + t, valid=self.valid[:, t], codebook_ce=self.codebook_ce[:, :, t],
                            audio_ce=self.audio_ce[:, t], audio_ce_weighted=self.audio_ce_weighted[:, t],
                            text_token=self.text_token[:, t])


@dataclass
class SequenceScores:
    """All per-frame losses of one sequence, as numpy arrays (what `<out>/sequences/<id>.npz` holds)."""
    index: int                 # position of the sequence in the batch / list given to `score`
    sequence_id: str
    audio_ce: np.ndarray           # [T] float32
    audio_ce_weighted: np.ndarray  # [T] float32
    codebook_ce: np.ndarray        # [K, T] float32
    text_token: np.ndarray         # [T] int64

    @property
    def num_frames(self) -> int:
        return int(self.audio_ce.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"audio_ce": self.audio_ce, "audio_ce_weighted": self.audio_ce_weighted,
                "codebook_ce": self.codebook_ce, "text_token": self.text_token}


def _user_tokens(user_stream: str, silence: torch.Tensor | None, num_user: int) -> torch.Tensor | str:
    """Silence codes as `[num_user, n]` (the last column repeats beyond n), or "zero" for the zero stream."""
    if user_stream not in USER_STREAMS:
        raise ValueError(f"user_stream must be one of {USER_STREAMS}, got {user_stream!r}.")
    if user_stream == "zero":
        if silence is not None:
            raise ValueError("silence was given but user_stream='zero' feeds no input: pass "
                             "user_stream='silence' to use it, or silence=None.")
        return "zero"
    if silence is None:
        raise ValueError("user_stream='silence' needs `silence`: the Mimi codes of digital silence, "
                         f"[{num_user}, n] or [{num_user}] (see moshi_eval.codes.silence_codes).")
    if silence.dim() == 1:
        silence = silence[:, None]
    if silence.dim() != 2 or silence.shape[0] != num_user or silence.shape[1] == 0:
        raise ValueError(f"silence must have shape [{num_user}, n] or [{num_user}] (the user stream's "
                         f"codebooks), got {tuple(silence.shape)}.")
    if silence.dtype.is_floating_point:
        raise ValueError(f"silence must hold integer tokens, got dtype {silence.dtype}.")
    return silence.long()


def score(lm_gen, codes: torch.Tensor | tp.Sequence[torch.Tensor], user_stream: str = "silence",
          text: str = "predicted", silence: torch.Tensor | None = None, max_frames: int | None = None,
          progress: "bool | tqdm" = True, first_codebook_weight: float = DEFAULT_FIRST_CODEBOOK_WEIGHT,
          lengths: tp.Sequence[int] | None = None, sequence_ids: tp.Sequence[str] | None = None,
          chunk: int = DEFAULT_CHUNK) -> tp.Iterator[FrameLoss]:
    """Stream a batch of sequences through `lm_gen` and yield the audio cross-entropy of each frame.

    `score_chunks`, one frame at a time: same arguments, yields `FrameLoss` for frames 0, 1, ... in order.
    """
    for losses in score_chunks(lm_gen, codes, user_stream=user_stream, text=text, silence=silence,
                               max_frames=max_frames, progress=progress,
                               first_codebook_weight=first_codebook_weight, lengths=lengths,
                               sequence_ids=sequence_ids, chunk=chunk):
        yield from losses.frames()


def score_chunks(lm_gen, codes: torch.Tensor | tp.Sequence[torch.Tensor], user_stream: str = "silence",
                 text: str = "predicted", silence: torch.Tensor | None = None, max_frames: int | None = None,
                 progress: "bool | tqdm" = True, first_codebook_weight: float = DEFAULT_FIRST_CODEBOOK_WEIGHT,
                 lengths: tp.Sequence[int] | None = None, sequence_ids: tp.Sequence[str] | None = None,
                 chunk: int = DEFAULT_CHUNK) -> tp.Iterator[ChunkLoss]:
    """Stream a batch of sequences through `lm_gen` and yield the audio cross-entropy of each frame.

    Args:
        lm_gen: a `moshi_patch.LMGen`, not streaming yet (this opens `lm_gen.streaming(B)`).
        codes: `[B, K, T]` (all sequences as long, unless `lengths`) or a list of `[K, T_i]`;
            K = `lm_model.dep_q`, tokens in `[0, card)`.
        user_stream: "silence" (the user stream holds `silence`) or "zero" (-1: no input).
        text: "predicted" (the model's argmax: needs `use_sampling=False`), "pad" (forced to
            `lm_model.text_padding_token_id`) or "zero" (-1: no text input; `text_token` is then -1).
        silence: for "silence", Mimi codes of digital silence `[n_q - dep_q, n]` or `[n_q - dep_q]`; user
            frame f is column `min(f, n - 1)` (silence codes are constant after a few frames).
        max_frames: score at most this many frames of each sequence. The frames after them still feed
            the flush of the delays: the kept frames get the losses of the full sequence.
        progress: show a tqdm bar (scored frames, frames/s) on stderr; or a tqdm bar to update.
        first_codebook_weight: weight of codebook 0 in `audio_ce_weighted`.
        lengths: for a padded `[B, K, T]` tensor, the length of each sequence.
        sequence_ids: names used in error messages (default "sequence <i>").
        chunk: frames per `step_with_logits` call (1: one streaming step per frame). The losses are the
            same whatever the chunk, up to float rounding (tests/test_chunked.py, tests/test_scoring.py).
    Yields:
        `ChunkLoss` of consecutive frames from frame 0 up to the longest length, in order. A sequence
        shorter than the longest keeps being streamed (forced to the zero token) but its frames beyond its
        length are marked invalid and never counted.
    Raises:
        ValueError: bad arguments (named); NonFiniteLossError: non-finite logits or loss at a scored frame.
    """
    lm_model = lm_gen.lm_model
    K, card = lm_model.dep_q, lm_model.card
    if K == 0:
        raise ValueError("the model has no audio codebooks to score (dep_q == 0).")
    if text not in TEXT_MODES:
        raise ValueError(f"text must be one of {TEXT_MODES}, got {text!r}.")
    if text == "predicted" and lm_gen.use_sampling:
        raise ValueError("text='predicted' scores against the model's argmax text: build the LMGen with "
                         "use_sampling=False (got use_sampling=True).")
    if max_frames is not None and max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}.")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (frames per streaming call), got {chunk!r}.")
    codebook_weights(K, first_codebook_weight)  # Checked before streaming starts.
    num = len(codes)
    ids = list(sequence_ids) if sequence_ids is not None else [f"sequence {i}" for i in range(num)]
    if len(ids) != num:
        raise ValueError(f"sequence_ids has {len(ids)} names for {num} sequences.")
    batch, lens = batch_codes(codes, K, card, lengths, ids)
    num_user = lm_model.n_q - lm_model.dep_q
    user = _user_tokens(user_stream, silence, num_user)
    scored = [min(n, max_frames) if max_frames is not None else n for n in lens]

    device = lm_model.device
    # The targets, on the device once: -1 after each sequence's end, never scored there.
    targets_all = batch.to(device)
    with ExitStack() as stack:
        if device.type != "cuda":
            # Moshi compiles a few small functions (RMSNorm, rope, gating) lazily; on a CPU compiling costs
            # tens of seconds per batch shape and saves nothing.
            stack.enter_context(no_compile())
        if isinstance(progress, tqdm):
            bar = progress      # the caller's bar, e.g. one over all batches of a run
        else:
            bar = stack.enter_context(tqdm(total=sum(scored), unit="frame", disable=not progress,
                                           desc="scoring", smoothing=0.1, dynamic_ncols=True))
        for forced in teacher_force(lm_gen, batch, text=text, user=user, lengths=lens, max_frames=max_frames,
                                    chunk=chunk, names=ids):
            if forced.logits.audio_logits is None:
                raise RuntimeError(f"step_with_logits returned no audio logits for frames {forced.start} .. "
                                   f"{forced.stop - 1}.")
            losses = _chunk_losses(forced, targets_all, first_codebook_weight, ids)
            bar.update(int(losses.valid.sum()))
            yield losses


def _chunk_losses(forced: ForcedChunk, targets_all: torch.Tensor, first_codebook_weight: float,
                  ids: list[str]) -> ChunkLoss:
    """Losses of the frames of `forced`, with one device -> host copy."""
    out, start, end, valid = forced.logits, forced.start, forced.stop, forced.valid
    assert out.audio_logits is not None
    K = out.audio_logits.shape[1]
    # Targets were range-checked once by `batch_codes`: no check here (it would sync the device).
    ce = audio_cross_entropy(out.audio_logits, targets_all[:, :, start:end], first_codebook_weight,
                             mask=valid[:, None], check_targets=False)
    # One device -> host copy: [B, K, n] CE, plain, weighted, text token, valid. A NaN or +inf logit makes its
    # frame's cross-entropy non-finite, so the logits themselves are only read to name the fault (a -inf
    # logit of another token leaves a finite, valid cross-entropy).
    packed = torch.cat([ce.codebook_ce, ce.audio_ce[:, None], ce.audio_ce_weighted[:, None],
                        out.tokens[:, :1].float(), valid[:, None].float()], dim=1).cpu()
    codebook_ce, rest = packed[:, :K], packed[:, K:]
    valid_cpu = rest[:, 3] > 0
    bad = valid_cpu[:, None] & ~torch.isfinite(codebook_ce)
    if bad.any():
        b, k, t = (int(i) for i in bad.nonzero()[0])
        what = "cross-entropy" if bool(torch.isfinite(out.audio_logits[b, k, t]).all()) else "logits"
        raise NonFiniteLossError(
            f"non-finite {what} for {ids[b]} at frame {start + t} (audio codebook {k}): "
            f"codebook_ce = {float(codebook_ce[b, k, t])}. Check the model weights and dtype.",
            sequence_id=ids[b], frame=start + t)
    return ChunkLoss(start=start, valid=valid_cpu, codebook_ce=codebook_ce, audio_ce=rest[:, 0],
                     audio_ce_weighted=rest[:, 1], text_token=torch.where(valid_cpu, rest[:, 2].long(), -1))


def score_sequences(lm_gen, codes: torch.Tensor | tp.Sequence[torch.Tensor],
                    sequence_ids: tp.Sequence[str] | None = None, **kwargs: tp.Any
                    ) -> tp.Iterator[SequenceScores]:
    """`score_chunks`, collected per sequence: yields each sequence's `SequenceScores` as soon as it is
    complete. Sequences come out in order of length (shorter first). `kwargs` go to `score_chunks`.
    """
    num = len(codes)
    ids = list(sequence_ids) if sequence_ids is not None else [f"sequence {i}" for i in range(num)]
    max_frames = kwargs.get("max_frames")
    lengths = kwargs.get("lengths")
    if lengths is None:
        lengths = [int(c.shape[-1]) for c in codes]
    lens = [min(n, max_frames) if max_frames else n for n in lengths]
    K = lm_gen.lm_model.dep_q
    store = [SequenceScores(index=i, sequence_id=ids[i],
                            audio_ce=np.full(n, np.nan, np.float32),
                            audio_ce_weighted=np.full(n, np.nan, np.float32),
                            codebook_ce=np.full((K, n), np.nan, np.float32),
                            text_token=np.full(n, -1, np.int64)) for i, n in enumerate(lens)]
    for losses in score_chunks(lm_gen, codes, sequence_ids=ids, **kwargs):
        start, n = losses.start, losses.valid.shape[1]
        for i in np.nonzero(losses.valid.any(dim=1).numpy())[0]:
            s = store[i]
            stop = min(start + n, lens[i])
            m = stop - start
            s.audio_ce[start:stop] = losses.audio_ce[i, :m].numpy()
            s.audio_ce_weighted[start:stop] = losses.audio_ce_weighted[i, :m].numpy()
            s.codebook_ce[:, start:stop] = losses.codebook_ce[i, :, :m].numpy()
            s.text_token[start:stop] = losses.text_token[i, :m].numpy()
            if stop == lens[i]:
                yield s
