"""Teacher forcing a stream through `LMGen.step_with_logits`: the one place where the rule lives.

To get, while streaming, the logits `LMModel.forward(codes)` gives for the same codes, each step `s` must:
- force frame `s` of the model's own streams (text and audio codebooks), undelayed: `step_with_logits`
  schedules each stream by its delay;
- pass frame `s - 1` of the user stream (what step 0 gets is ignored: the model reads its initial token);
- go on for `max_delay` more steps after the last frame: step `s` returns frame `s - max_delay`, so the
  delayed codebooks of the last frames come out during those flush steps.

During the flush (and after a shorter item of a batch has ended), the audio of a frame that the codes do not
hold is forced to the zero token (-1, "no input"): what `LMModel.forward` sees for codes padded with -1.
Frames that the codes do hold are always forced, also beyond `max_frames`: the last kept frame's delayed
codebooks are conditioned on the next frame's first codebook, so a score cut at N frames then equals the
first N frames of the full score.

`teacher_force` streams a whole batch and yields the `StepLogits` of each call with the frames they belong
to; `TeacherForcing.inputs` gives the tokens of any steps, for callers that drive `step_with_logits`
themselves.
"""
from contextlib import ExitStack
from dataclasses import dataclass
import typing as tp

import torch

from .lm import StepLogits

__all__ = ["ForcedChunk", "TEXT_MODES", "TeacherForcing", "batch_codes", "teacher_force"]

# Text stream modes: "predicted" the model's own greedy text (-2), "pad" forced to the text padding id,
# "zero" no text input (-1). A tensor of tokens forces the text instead.
TEXT_MODES = ("predicted", "pad", "zero")


@dataclass
class ForcedChunk:
    """What one `step_with_logits` call of `teacher_force` returned: frames `start .. stop - 1`."""

    start: int                # first frame (0-based)
    valid: torch.Tensor       # [B, n] bool, on the logits' device: frame < the item's scored length
    logits: StepLogits        # tokens [B, 1 + dep_q, n], text_logits [B, 1, n, text_card_out],
    #                           audio_logits [B, dep_q, n, card] (None for a model without depformer)

    @property
    def stop(self) -> int:
        return self.start + int(self.valid.shape[1])


def batch_codes(codes: torch.Tensor | tp.Sequence[torch.Tensor], num_codebooks: int, card: int,
                lengths: tp.Sequence[int] | None = None, names: tp.Sequence[str] | None = None
                ) -> tuple[torch.Tensor, list[int]]:
    """Codes `[B, K, T]` (with optional per-item `lengths`) or a list of `[K, T_i]` -> a CPU tensor
    `[B, K, max T_i]` padded with -1 (no input) after each item's length, and the lengths.

    Raises ValueError naming the item (`names[i]`, default "sequence <i>") for a wrong shape or dtype, an
    empty item, or a token outside `[0, card)`.
    """
    if isinstance(codes, torch.Tensor):
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, {num_codebooks}, T] or a list of [{num_codebooks}, T_i], "
                             f"got a tensor of shape {tuple(codes.shape)}.")
        items = list(codes)
        if lengths is not None:
            if len(lengths) != len(items):
                raise ValueError(f"lengths has {len(lengths)} entries for a batch of {len(items)} sequences.")
            for i, n in enumerate(lengths):
                if not 0 < n <= codes.shape[-1]:
                    raise ValueError(f"lengths[{i}] = {n} must be in [1, {codes.shape[-1]}].")
            items = [item[:, :n] for item, n in zip(items, lengths)]
    else:
        items = list(codes)
        if lengths is not None:
            raise ValueError("lengths is only for a padded [B, K, T] codes tensor; a list has its own lengths.")
    if not items:
        raise ValueError("codes holds no sequence.")
    if names is None:
        names = [f"sequence {i}" for i in range(len(items))]
    elif len(names) != len(items):
        raise ValueError(f"names has {len(names)} entries for {len(items)} sequences.")
    for name, item in zip(names, items):
        if not isinstance(item, torch.Tensor) or item.dim() != 2 or item.shape[0] != num_codebooks:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"{name}: codes must have {num_codebooks} codebooks (the model's dep_q), shape "
                             f"[{num_codebooks}, T], got {shape}.")
        if item.dtype.is_floating_point:
            raise ValueError(f"{name}: codes must hold integer tokens, got dtype {item.dtype}.")
        if item.shape[1] == 0:
            raise ValueError(f"{name}: sequence has no frame.")
        if item.numel() and (item.min() < 0 or item.max() >= card):
            raise ValueError(f"{name}: codes must be tokens in [0, card={card}), got values in "
                             f"[{int(item.min())}, {int(item.max())}].")
    lens = [int(item.shape[1]) for item in items]
    batch = torch.full((len(items), num_codebooks, max(lens)), -1, dtype=torch.long)
    for i, item in enumerate(items):
        batch[i, :, : lens[i]] = item.cpu()
    return batch, lens


def _tokens_arg(name: str, tokens: torch.Tensor, shape: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a mode name or a torch.Tensor of tokens {shape}, "
                        f"got {type(tokens).__name__}.")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer tokens, got dtype {tokens.dtype}.")
    return tokens.detach().long().cpu()


class TeacherForcing:
    """The tokens to give `step_with_logits` at each step to teacher force a batch of sequences.

    Args:
        lm_model: the `LMModel` streamed (for its streams, delays and special ids).
        audio: the model's own audio codes `[B, dep_q, T]` (optionally with per-item `lengths`) or a list of
            `[dep_q, T_i]`, tokens in `[0, card)`: forced at every frame the codes hold.
        text: "predicted" (-2: the model's greedy text), "pad" (the text padding id), "zero" (-1: no text
            input), or forced tokens `[B, T']` (frames past `T'` get -1).
        user: "zero" (-1: no input), tokens `[Ku]` or `[Ku, n]` shared by the batch (e.g. Mimi codes of
            silence), or `[B, Ku, n]` per item, `Ku = n_q - dep_q`; user frame `f` is column `min(f, n - 1)`.
        lengths: frames of each item of a padded `audio` tensor (default: all of them).
        max_frames: stream at most this many frames of each item. Frames of the codes after them are still
            forced during the flush, so the kept frames get the logits of the full sequence.
        names: names of the items in error messages (default "sequence <i>").
    Attributes:
        lengths: frames streamed and returned for each item (`min(T_i, max_frames)`).
        num_frames: the longest of them; `num_steps = num_frames + max_delay` steps return them all.
    """

    def __init__(self, lm_model: tp.Any, audio: torch.Tensor | tp.Sequence[torch.Tensor],
                 text: str | torch.Tensor = "predicted", user: str | torch.Tensor = "zero",
                 lengths: tp.Sequence[int] | None = None, max_frames: int | None = None,
                 names: tp.Sequence[str] | None = None) -> None:
        if max_frames is not None and (not isinstance(max_frames, int) or isinstance(max_frames, bool)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}.")
        dep_q = lm_model.dep_q
        num_user = lm_model.n_q - dep_q
        batch, available = batch_codes(audio, dep_q, lm_model.card, lengths, names)
        B = batch.shape[0]
        self.lengths = [min(n, max_frames) if max_frames is not None else n for n in available]
        self.num_frames = max(self.lengths)
        self.max_delay = max(lm_model.delays)
        self.num_steps = self.num_frames + self.max_delay
        width = self.num_steps
        forced = torch.full((B, 1 + dep_q, width), lm_model.zero_token_id, dtype=torch.long)
        audio_width = min(width, batch.shape[-1])
        forced[:, 1:, :audio_width] = batch[:, :, :audio_width]
        if isinstance(text, str):
            if text not in TEXT_MODES:
                raise ValueError(f"text must be one of {TEXT_MODES} or a tensor of tokens [B, T], got {text!r}.")
            forced[:, 0] = {"predicted": lm_model.ungenerated_token_id, "pad": lm_model.text_padding_token_id,
                            "zero": lm_model.zero_token_id}[text]
        else:
            tokens = _tokens_arg("text", text, "[B, T]")
            if tokens.dim() != 2 or tokens.shape[0] != B:
                raise ValueError(f"text tokens must have shape [B={B}, T], got {list(tokens.shape)}.")
            if tokens.numel() and (tokens.min() < -1 or tokens.max() >= lm_model.text_card):
                raise ValueError(f"text tokens must be -1 (no input) or in [0, text_card={lm_model.text_card}), "
                                 f"got values in [{int(tokens.min())}, {int(tokens.max())}].")
            text_width = min(width, tokens.shape[-1])
            forced[:, 0, :text_width] = tokens[:, :text_width]
        self.text_mode = text if isinstance(text, str) else "forced"
        self.forced = forced                               # [B, 1 + dep_q, num_steps], CPU
        self.user = self._user_tokens(lm_model, user, B, num_user)    # [B, Ku, n], CPU

    @staticmethod
    def _user_tokens(lm_model: tp.Any, user: str | torch.Tensor, B: int, num_user: int) -> torch.Tensor:
        if isinstance(user, str):
            if user != "zero":
                raise ValueError(f"user must be 'zero' or a tensor of tokens ([Ku], [Ku, n] or [B, Ku, n] with "
                                 f"Ku = {num_user}), got {user!r}.")
            return torch.full((B, num_user, 1), lm_model.zero_token_id, dtype=torch.long)
        tokens = _tokens_arg("user", user, f"[{num_user}], [{num_user}, n] or [{B}, {num_user}, n]")
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        if tokens.dim() == 2:
            tokens = tokens[None].expand(B, -1, -1)
        if tokens.dim() != 3 or tuple(tokens.shape[:2]) != (B, num_user) or tokens.shape[2] == 0:
            raise ValueError(f"user tokens must have shape [{num_user}], [{num_user}, n] or [{B}, {num_user}, n] "
                             f"(the user stream's {num_user} codebooks), got {list(user.shape)}.")
        if tokens.numel() and (tokens.min() < -1 or tokens.max() >= lm_model.card):
            raise ValueError(f"user tokens must be -1 (no input) or in [0, card={lm_model.card}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}].")
        return tokens

    def inputs(self, step: int, frames: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_tokens [B, Ku, frames], forced_tokens [B, 1 + dep_q, frames])` of steps `step ..
        step + frames - 1` (CPU tensors: `step_with_logits` range-checks them without a device sync)."""
        if step < 0 or frames < 1 or step + frames > self.num_steps:
            raise ValueError(f"steps {step} .. {step + frames - 1} are outside the {self.num_steps} steps "
                             "of the stream.")
        # User frame s - 1 goes in at step s; step 0's input is ignored.
        columns = (torch.arange(step, step + frames) - 1).clamp(0, self.user.shape[2] - 1)
        return self.user[:, :, columns], self.forced[:, :, step:step + frames]


def _chunk_sizes(chunk: int | tp.Sequence[int]) -> list[int]:
    sizes = [chunk] if isinstance(chunk, int) else list(chunk)
    if not sizes or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in sizes):
        raise ValueError(f"chunk must be a positive integer (frames per step_with_logits call) or a list of "
                         f"them, got {chunk!r}.")
    return sizes


def teacher_force(lm_gen: tp.Any, audio: torch.Tensor | tp.Sequence[torch.Tensor],
                  text: str | torch.Tensor = "predicted", user: str | torch.Tensor = "zero",
                  lengths: tp.Sequence[int] | None = None, max_frames: int | None = None,
                  chunk: int | tp.Sequence[int] = 1, names: tp.Sequence[str] | None = None
                  ) -> tp.Iterator[ForcedChunk]:
    """Stream a batch through `lm_gen.step_with_logits`, teacher forcing the model's audio (and text).

    Args:
        lm_gen: an `LMGen` with `step_with_logits`, not streaming (this opens `lm_gen.streaming(B)` and closes
            it at the end), or streaming with batch size B at its first step (fresh or just reset; it is left
            open).
        audio, text, user, lengths, max_frames, names: see `TeacherForcing`. `text="predicted"` needs
            `use_sampling=False` (greedy text).
        chunk: frames per call (1: one step per frame; C > 1 needs `moshi_patch.LMGen`), or a list of them,
            the last one repeated.
    Yields:
        `ForcedChunk` of consecutive frames `0 .. max(lengths) - 1`, in order, one per call that returned
        frames. The frames of an item after its length are marked invalid in `valid`.
    Raises:
        ValueError / TypeError naming the argument for bad input.
    """
    lm_model = lm_gen.lm_model
    sizes = _chunk_sizes(chunk)
    plan = TeacherForcing(lm_model, audio, text=text, user=user, lengths=lengths, max_frames=max_frames,
                          names=names)
    if plan.text_mode == "predicted" and lm_gen.use_sampling:
        raise ValueError("text='predicted' forces the model's greedy text: build the LMGen with "
                         "use_sampling=False (got use_sampling=True).")
    B = plan.forced.shape[0]
    with ExitStack() as stack:
        state = lm_gen._streaming_state
        if state is None:
            stack.enter_context(lm_gen.streaming(B))
        elif state.batch_size != B:
            raise ValueError(f"lm_gen is streaming with batch size {state.batch_size}, but audio holds {B} "
                             "sequences.")
        elif state.offset_cpu != 0 or bool((state.offsets != 0).any()):
            raise ValueError(f"lm_gen is streaming at step {state.offset_cpu}: teacher forcing starts at frame 0, "
                             "call lm_gen.reset_streaming() first.")
        # On the device once: `valid` is then computed there, with no host-to-device copy (a sync) per chunk.
        lens = torch.tensor(plan.lengths, device=lm_model.device)
        step = i = 0
        while step < plan.num_steps:
            n = min(sizes[min(i, len(sizes) - 1)], plan.num_steps - step)
            out = lm_gen.step_with_logits(*plan.inputs(step, n))
            step += n
            i += 1
            if out is None:
                continue
            frames = int(out.tokens.shape[2])
            start = step - plan.max_delay - frames      # step s returns frame s - max_delay
            index = torch.arange(start, start + frames, device=lens.device)
            valid = index[None] < lens[:, None]
            yield ForcedChunk(start, valid, out)
