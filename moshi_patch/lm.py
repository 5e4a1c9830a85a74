# moshi-patch: LMGen.step_with_logits, written to read as part of moshi/models/lm.py.
#
# Everything between an `# upstream-begin: <place>` and the matching `# upstream-end` line is inserted
# verbatim into moshi/models/lm.py by `python -m moshi_patch.upstream` (the second pull request): that code
# only uses names that moshi/models/lm.py itself defines or imports.
"""Moshi's `LMGen` with `step_with_logits`: the logits of each streaming step.

Frame convention (the one of `LMModel.forward` codes and of what `LMGen.step` returns): at streaming step
`s` (0-based), stream `k` produces its frame `s - delays[k]`; `step` returns frame `s - max_delay` of every
model stream (None while `s < max_delay`). `step_with_logits` takes the forced tokens of frame `s`,
undelayed, schedules each stream by its delay, and returns the tokens and logits of frame `s - max_delay`.

A stream that never calls `step_with_logits` is upstream's: nothing is installed on the `LMGen` or its
streaming state. The first `step_with_logits` call of a stream makes its `_StepLogitsState`; each call then
lends `_step` a depformer step that records the logits (`_depformer_step_with_logits`, its own CUDA graph)
and text hooks that force and record, each calling the caller's hook, and gives the caller's back.
"""
from dataclasses import dataclass
import typing as tp

import torch

from moshi.models import lm as _upstream
from moshi.models.lm import _LMGenState
from moshi.utils.compile import CUDAGraphed
from moshi.utils.sampling import sample_token

from .chunking import StreamingSnapshot, check_multi_frame_support, reserve_kv_steps

__all__ = ["ChunkStats", "LMGen", "StepLogits"]


# upstream-begin: module
@dataclass
class StepLogits:
    """Output of `LMGen.step_with_logits`: the tokens of one frame and the logits they came from.

    All three belong to the same frame: `s - max_delay` at step `s`. The logits are those the tokens were
    chosen from: after CFG mixing and after the caller's `on_text_logits_hook`. They are copies that stay
    valid after the next step, and keep the model's dtype (cast them to float32 before a cross-entropy).
    The logits of a batch item that returned no frame (masked by `set_exec_mask`, or still in its first
    `max_delay` steps after a reset) are NaN.
    """

    tokens: torch.Tensor  # [B, 1 + dep_q, 1], exactly what `step()` returns at this step.
    text_logits: torch.Tensor  # [B, 1, 1, text_card_out]
    audio_logits: torch.Tensor | None  # [B, dep_q, 1, card], None for a model without depformer.


@dataclass
class _StepLogitsState:
    """Everything `LMGen.step_with_logits` keeps for one stream, made by its first call in the stream.

    Because of the delays, the forced tokens of a frame are used up to `max_delay` steps after they were
    given, and the logits of a frame are complete `max_delay` steps after the first of them was computed.
    Both are kept in rings of `max_delay + 1` frames, indexed per batch item by `frame % (max_delay + 1)`.
    A masked item (`set_exec_mask`) does not advance, so whatever a masked step writes lands in the slots of
    the item's current frame, which its next executed step writes again.

    A step run by `step()` keeps no logits. `_step` gives `state.offsets` a new tensor at each step, so a
    step run outside `step_with_logits` shows as `state.offsets` not being the tensor the last call left:
    the frames from `complete_from` on are the first whose logits are all kept.
    """

    batch_index: torch.Tensor  # [B], arange(B), to index the rings per item.
    codebook_index: torch.Tensor  # [dep_q], arange(dep_q), to index the audio ring per codebook.
    forced: torch.Tensor  # [B, 1 + dep_q, max_delay + 1], forced tokens by frame, -2 where not forced.
    text_logits: torch.Tensor  # [B, 1, max_delay + 1, text_card_out], text logits by frame.
    audio_logits: torch.Tensor | None  # [B, dep_q, max_delay + 1, card], audio logits by frame.
    graphed_depth: CUDAGraphed | None  # `_depformer_step_with_logits` (CUDA graphed on GPU).
    complete_from: torch.Tensor  # [B], first frame of each item whose logits are all kept.
    offsets: torch.Tensor  # `state.offsets` as the last call left it.
    # Until tokens are forced for the first time, the forced ring holds only -2 and is not maintained.
    any_forced: bool = False
    # Whether some frame still to be returned may lack logits (`complete_from` is then checked).
    incomplete: bool = True
# upstream-end


class StepLogitsLMGen(_upstream.LMGen):
    """`moshi.models.lm.LMGen` with `step_with_logits` of one frame per call: the code between the upstream
    markers, which the second upstream pull request adds to moshi. `step` and every other method are
    upstream's."""

    def _init_streaming_state(self, batch_size: int) -> _LMGenState:
        state = super()._init_streaming_state(batch_size)
        # The field the pull request declares on `_LMGenState`: no `step_with_logits` state until its first call.
        state.step_logits = None
        return state

    # upstream-begin: LMGen
    def _step_logits_state(self) -> _StepLogitsState:
        """The stream's `_StepLogitsState`, made at the first call; frames before that have no logits."""
        state = self._streaming_state
        if state.step_logits is None:
            state.step_logits = self._init_step_logits_state(state)
        return state.step_logits

    def _init_step_logits_state(self, state: _LMGenState) -> _StepLogitsState:
        lm_model = self.lm_model
        batch_size = state.batch_size
        device, dtype = lm_model.device, lm_model.dtype
        ring = self.max_delay + 1
        text_card = lm_model.text_linear.out_features
        forced = torch.full((batch_size, 1 + lm_model.dep_q, ring), lm_model.ungenerated_token_id,
                            device=device, dtype=torch.long)
        text_logits = torch.full((batch_size, 1, ring, text_card), float('nan'), device=device, dtype=dtype)
        audio_logits = graphed_depth = None
        if lm_model.depformer is not None:
            audio_logits = torch.full((batch_size, lm_model.dep_q, ring, lm_model.card), float('nan'),
                                      device=device, dtype=dtype)
            graphed_depth = CUDAGraphed(self._depformer_step_with_logits, disable=device.type != 'cuda')
        return _StepLogitsState(
            torch.arange(batch_size, device=device), torch.arange(lm_model.dep_q, device=device), forced,
            text_logits, audio_logits, graphed_depth, complete_from=state.offsets.clone(), offsets=state.offsets)

    def _check_logits_kept(self, logits_state: _StepLogitsState, frames: int = 1) -> None:
        """Raise before a call whose `frames` steps would return a frame some of whose logits were computed
        by `step()` (which keeps none), or before this stream's first `step_with_logits` call."""
        state = self._streaming_state
        D = self.max_delay
        if state.offsets is not logits_state.offsets:
            # Steps ran outside step_with_logits: their frames have no logits, and nothing was forced there.
            logits_state.complete_from = state.offsets.clone()
            logits_state.forced.fill_(self.lm_model.ungenerated_token_id)
            logits_state.incomplete = True
        elif logits_state.incomplete:
            # `reset_streaming` sets the offsets of the items it resets back to 0, in place.
            logits_state.complete_from = torch.minimum(logits_state.complete_from, state.offsets)
        if not logits_state.incomplete:
            return
        offsets = state.offsets
        first_returned = (offsets - D).clamp(min=0)
        returned = (first_returned < offsets + frames - D) & state.exec_mask
        missing = returned & (first_returned < logits_state.complete_from)
        flags = torch.stack([missing.any(), (offsets + frames - D >= logits_state.complete_from).all()]).cpu()
        if flags[0]:
            b = int(missing.nonzero()[0])
            raise RuntimeError(
                f"step_with_logits cannot return the logits of frame {int(first_returned[b])} (batch item {b}): "
                f"they were computed by a step without logits (`step()` or `step_with_extra_heads()`, up to "
                f"frame {int(logits_state.complete_from[b]) - 1}). Call step_with_logits at every step of a "
                "stream whose logits you need, from its start, or call `reset_streaming()` first.")
        logits_state.incomplete = not bool(flags[1])

    def _depformer_step_with_logits(self, text_token: torch.Tensor, transformer_out: torch.Tensor,
                                    forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The depformer of a `step_with_logits` step, codebook by codebook as `depformer_step`, sampling
        alike, forcing the codebooks of `forced [B, dep_q]` that are not -2.

        Returns the tokens `[B, dep_q]` and the logits `[B, dep_q, card]` each was chosen from (after CFG).
        """
        lm_model = self.lm_model
        assert lm_model.depformer is not None
        cfg = self.cfg_coef != 1.
        previous = text_token
        tokens: list[torch.Tensor] = []
        logits_per_codebook: list[torch.Tensor] = []
        with lm_model.depformer.streaming(text_token.shape[0] * (2 if cfg else 1)):
            for cb_index in range(lm_model.dep_q):
                depformer_input = previous[:, None, None]
                if cfg:
                    depformer_input = depformer_input.repeat(2, 1, 1)
                logits = self._mix_cfg(lm_model.forward_depformer(cb_index, depformer_input, transformer_out))
                sampled = sample_token(logits.float(), self.use_sampling, self.temp, self.top_k)[:, 0, 0]
                to_force = forced[:, cb_index]
                previous = torch.where(to_force == lm_model.ungenerated_token_id, sampled, to_force)
                tokens.append(previous)
                logits_per_codebook.append(logits[:, 0, 0])
        return torch.stack(tokens, dim=1), torch.stack(logits_per_codebook, dim=1)

    def _depformer_for_logits(self, logits_state: _StepLogitsState, text_token: torch.Tensor,
                              transformer_out: torch.Tensor, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `[B, dep_q]` and logits `[B, dep_q, card]` of the depformer at a `step_with_logits` step."""
        assert logits_state.graphed_depth is not None
        return logits_state.graphed_depth(text_token, transformer_out, forced)

    def _mix_cfg(self, logits: torch.Tensor) -> torch.Tensor:
        # Same mixing as `depformer_step`: [2 * B, ...] conditioned then unconditioned -> [B, ...].
        if self.cfg_coef == 1.:
            return logits
        logits, logits_null = logits.chunk(2)
        return logits_null + (logits - logits_null) * self.cfg_coef

    @torch.no_grad()
    def step_with_logits(self, input_tokens: torch.Tensor,
                         forced_tokens: torch.Tensor | None = None) -> StepLogits | None:
        """Streaming step that also returns the text and audio logits of the frame it returns.

        Args:
            input_tokens (torch.Tensor): user stream `[B, n_q - dep_q, 1]`, as for `step()`. To reproduce
                `LMModel.forward(codes)`, pass `codes[:, dep_q + 1:, s - 1]` at step `s`.
            forced_tokens (torch.Tensor or None): frame `s` of the model's own streams `[B, 1 + dep_q, 1]`
                (text, then its audio codebooks), undelayed as the codes of `LMModel.forward`. `-2`
                (`ungenerated_token_id`) leaves the token to the model: argmax when `use_sampling=False`,
                else sampled exactly as `step()` samples. Any other value is teacher forced: written to the
                cache and used to condition the next codebooks (`-1`, `zero_token_id`, means no input).
                None forces nothing. Each stream is scheduled by its delay internally.
        Returns:
            None exactly when `step()` would (the first `max_delay` steps), else the `StepLogits` of frame
            `s - max_delay`: its tokens (what `step()` returns) and the logits they came from.

        The caller's `on_text_logits_hook` and `on_text_hook` are called as by `step()` (the latter with the
        forced token); the logits returned are taken after the former. A frame some of whose logits were
        computed by `step()` cannot be returned: that raises a RuntimeError.
        """
        state = self._streaming_state
        if state is None:
            raise RuntimeError("step_with_logits must be called inside `with lm_gen.streaming(batch_size):`.")
        lm_model = self.lm_model
        if lm_model.training:
            raise RuntimeError("lm_model is in training mode: call lm_model.eval() before streaming, "
                               "dropout would make the logits random.")
        B = state.batch_size
        input_tokens = self._check_step_tokens("input_tokens", input_tokens, lm_model.n_q - lm_model.dep_q, B)
        # Before the copy to the device: no sync for CPU tokens.
        self._check_token_range("input_tokens", input_tokens, 1 + lm_model.dep_q)
        input_tokens = input_tokens.to(lm_model.device)
        if forced_tokens is not None:
            forced_tokens = self._check_step_tokens("forced_tokens", forced_tokens, 1 + lm_model.dep_q, B)
            self._check_token_range("forced_tokens", forced_tokens, 0)
            forced_tokens = forced_tokens.to(lm_model.device)
        logits_state = self._step_logits_state()
        self._check_logits_kept(logits_state)

        # `_step` replaces `state.offsets` by a new tensor, so this one keeps the frame of each item.
        offsets = state.offsets
        ring = self.max_delay + 1
        # Frame produced at this step by each of the model's streams, and its slot in the rings.
        frames = offsets[:, None] - self.delays_cuda[None, :1 + lm_model.dep_q]
        slots = frames % ring
        forced_now = torch.full_like(frames, lm_model.ungenerated_token_id)   # [B, 1 + dep_q]
        if forced_tokens is not None or logits_state.any_forced:
            logits_state.any_forced = True
            if forced_tokens is None:
                forced_tokens = forced_now[:, :, None]
            logits_state.forced[logits_state.batch_index, :, offsets % ring] = forced_tokens[:, :, 0]
            # Frames before the start of the stream are never seen by the model: nothing to force there.
            forced_now = torch.where(frames >= 0, logits_state.forced.gather(2, slots[:, :, None])[:, :, 0],
                                     forced_now)
        kept: dict[str, torch.Tensor] = {}
        caller_logits_hook, caller_text_hook = self.on_text_logits_hook, self.on_text_hook

        def on_text_logits(text_logits: torch.Tensor) -> None:
            if caller_logits_hook is not None:
                caller_logits_hook(text_logits)
            kept['text'] = text_logits[:, 0, 0].clone()   # What the text token is sampled from.

        def on_text(text_token: torch.Tensor) -> None:
            forced_text = forced_now[:, 0]
            text_token.copy_(torch.where(forced_text == lm_model.ungenerated_token_id, text_token, forced_text))
            if caller_text_hook is not None:
                caller_text_hook(text_token)

        def depformer(text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
            tokens, kept['audio'] = self._depformer_for_logits(logits_state, text_token, transformer_out,
                                                               forced_now[:, 1:])
            return tokens

        # Lent to `_step` for this call only; a hook the caller sets meanwhile is the one left.
        graphed_depth = state.graphed_depth
        self.on_text_logits_hook, self.on_text_hook = on_text_logits, on_text
        if graphed_depth is not None:
            state.graphed_depth = depformer
        try:
            out = self._step(input_tokens)
        finally:
            state.graphed_depth = graphed_depth
            if self.on_text_logits_hook is on_text_logits:
                self.on_text_logits_hook = caller_logits_hook
            if self.on_text_hook is on_text:
                self.on_text_hook = caller_text_hook
        logits_state.offsets = state.offsets

        logits_state.text_logits[logits_state.batch_index, 0, slots[:, 0]] = kept['text']
        if logits_state.audio_logits is not None:
            ring_index = (logits_state.batch_index[:, None], logits_state.codebook_index, slots[:, 1:])
            logits_state.audio_logits[ring_index] = kept['audio']
        if out is None:
            return None
        tokens = out[0]
        out_slot = (offsets - self.max_delay) % ring
        no_frame = ((offsets < self.max_delay) | ~state.exec_mask)[:, None, None, None]
        text_logits = logits_state.text_logits[logits_state.batch_index, :, out_slot][:, :, None]
        text_logits = torch.where(no_frame, float('nan'), text_logits)
        audio_logits = None
        if logits_state.audio_logits is not None:
            audio_logits = logits_state.audio_logits[logits_state.batch_index, :, out_slot][:, :, None]
            audio_logits = torch.where(no_frame, float('nan'), audio_logits)
        return StepLogits(tokens, text_logits, audio_logits)

    def _check_step_tokens(self, name: str, tokens: torch.Tensor, num_streams: int,
                           batch_size: int, frames: int = 1) -> torch.Tensor:
        expected = f"[{batch_size}, {num_streams}, {frames}] (batch size, streams, frames)"
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(tokens).__name__}.")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {tokens.dtype}.")
        if tokens.dim() != 3:
            raise ValueError(f"{name} must have rank 3, shape {expected}, got rank {tokens.dim()} "
                             f"with shape {list(tokens.shape)}.")
        if tokens.shape[0] != batch_size:
            raise ValueError(f"{name} has batch size {tokens.shape[0]}, but the stream was started with "
                             f"`streaming({batch_size})`: expected shape {expected}.")
        if tuple(tokens.shape[1:]) != (num_streams, frames):
            raise ValueError(f"{name} must have shape {expected}, got {list(tokens.shape)}.")
        return tokens.long()

    def _check_token_range(self, name: str, tokens: torch.Tensor, first_stream: int) -> None:
        """Raise a ValueError naming the first token of `tokens [B, K, T]` (streams `first_stream` to
        `first_stream + K - 1` of the model) out of range: the model's own streams take -2 (model's choice),
        -1 (no input) or a token of their card; the user's streams take -1 or a token."""
        lm_model = self.lm_model
        K = tokens.shape[1]
        cards = torch.full((K,), lm_model.card, device=tokens.device)
        if first_stream == 0:
            cards[0] = lm_model.text_card
        lowest = lm_model.ungenerated_token_id if first_stream <= lm_model.dep_q else lm_model.zero_token_id
        bad = (tokens < lowest) | (tokens >= cards[None, :, None])
        if bad.any():
            b, k, t = (int(i) for i in bad.nonzero()[0])
            stream = first_stream + k
            if stream == 0:
                what = "text"
            elif stream <= lm_model.dep_q:
                what = f"audio codebook {stream - 1}"
            else:
                what = f"user audio codebook {stream - 1 - lm_model.dep_q}"
            allowed = "-2 (model's choice), -1 (no input)" if lowest == lm_model.ungenerated_token_id else \
                "-1 (no input)"
            raise ValueError(
                f"{name}[{b}, {k}, {t}] = {int(tokens[b, k, t])} is out of range for stream {stream} "
                f"({what}): expected {allowed} or a token in [0, {int(cards[k])}).")
    # upstream-end


@dataclass
class ChunkStats:
    """What chunked `step_with_logits` calls did, summed since the `LMGen` was made (or the counts reset).

    A pass is one streaming call of the temporal transformer over some frames of a chunk. With teacher-forced
    text every chunk takes one pass. With text left to the model, the text tokens of a chunk are guessed,
    checked against the argmax each frame produces, and frames after a wrong guess are run again.
    """

    calls: int = 0           # chunked calls (C > 1)
    frames: int = 0          # frames streamed by them
    passes: int = 0          # transformer passes they took
    guesses: int = 0         # text guesses checked (batch items x frames)
    guesses_right: int = 0   # of which equal to the argmax they were checked against

    @property
    def passes_per_call(self) -> float | None:
        return self.passes / self.calls if self.calls else None

    @property
    def guess_accuracy(self) -> float | None:
        return self.guesses_right / self.guesses if self.guesses else None


@dataclass
class _ChunkPlan:
    """The tokens of a chunk of C steps, as the LMGen token cache would see them, steps `o .. o + C - 1`.

    `written [B, 1 + dep_q, max_delay + 1 + C]`: what the model's streams write at steps `o - max_delay - 1`
    to `o + C - 1` (before the chunk: read from the token cache), i.e. at step `t` the token of frame
    `t - delay`; `user [B, n_q - dep_q, C]`: the user's input of each step as it is read back by the model
    (already delayed). `text_free [B, C]`: steps whose text token is the model's argmax.
    """

    written: torch.Tensor
    user: torch.Tensor
    user_input: torch.Tensor  # [B, n_q - dep_q, C] the user's input as given, step by step
    is_init: torch.Tensor     # [B, K, C] steps that read the initial token
    text_free: torch.Tensor   # [B, C]
    any_text_free: bool       # text_free.any(), known on the CPU: no argmax to take when all text is forced


@dataclass
class _StreamLogitsState(_StepLogitsState):
    """`_StepLogitsState` with what `moshi_patch.LMGen` keeps for a stream besides: the parallel depformer
    of forced steps and the text verification window of chunks."""

    graphed_parallel: CUDAGraphed | None = None  # `_parallel_depformer_logits` (CUDA graphed on GPU).
    # Frames checked per pass when text is left to the model: grows while guesses are right, shrinks when
    # they are not, so a model whose text is hard to guess costs about the one-frame path. It starts afresh
    # with each stream: how a stream is cut into passes (hence its float rounding) must not depend on the
    # streams before it.
    text_window: int | None = None


class LMGen(StepLogitsLMGen):
    """`moshi.models.lm.LMGen` with `step_with_logits` over one frame or a chunk of frames per call.

    A stream that never calls `step_with_logits` runs upstream's `step` and nothing else. In a stream that
    has called it, `step()` is a `step_with_logits` step that forces nothing (same tokens, same sampling),
    so that the logits of every later frame are kept: the two can be mixed freely.
    """

    def __init__(self, *args: tp.Any, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_stats = ChunkStats()

    # When every audio token of a step is forced, `step_with_logits` computes the depformer logits with one
    # parallel call instead of `dep_q` sequential ones (same logits). Set to False to always go sequential.
    parallel_forced_depformer: bool = True

    def step(self, input_tokens: torch.Tensor,
             depformer_replace_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        # No `torch.no_grad()` here: upstream's `step` and `step_with_logits` have theirs, and a stream that
        # never calls `step_with_logits` must run exactly upstream's torch calls.
        state = self._streaming_state
        if state is None or state.step_logits is None or depformer_replace_tokens is not None:
            return super().step(input_tokens, depformer_replace_tokens)
        if self._needs_inference_mode():
            with torch.inference_mode():
                out = StepLogitsLMGen.step_with_logits(self, input_tokens)
        else:
            out = StepLogitsLMGen.step_with_logits(self, input_tokens)
        return None if out is None else out.tokens

    def _needs_inference_mode(self) -> bool:
        """Whether the stream's `step_with_logits` state was made under `torch.inference_mode()` and this call
        is outside it: torch updates inference tensors only in inference mode, so the call enters it."""
        state = self._streaming_state
        logits_state = None if state is None else state.step_logits
        return (logits_state is not None and logits_state.forced.is_inference()
                and not torch.is_inference_mode_enabled())

    def _init_step_logits_state(self, state: _LMGenState) -> _StreamLogitsState:
        base = super()._init_step_logits_state(state)
        disable = self.lm_model.device.type != 'cuda'
        return _StreamLogitsState(**vars(base), graphed_parallel=CUDAGraphed(self._parallel_depformer_logits,
                                                                             disable=disable))

    def _depformer_for_logits(self, logits_state: _StepLogitsState, text_token: torch.Tensor,
                              transformer_out: torch.Tensor, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The depformer logits from one parallel call when every audio token of the step is forced, else
        sequential. Before `max_delay` steps have run some tokens are of frames before the start, never forced,
        so not every audio token is forced anyway."""
        state = self._streaming_state
        assert isinstance(logits_state, _StreamLogitsState) and logits_state.graphed_parallel is not None
        if (not self.parallel_forced_depformer or not logits_state.any_forced
                or state.offset_cpu < self.max_delay or not self._all_audio_forced(forced, state.exec_mask)):
            return super()._depformer_for_logits(logits_state, text_token, transformer_out, forced)
        # Items that do not execute keep nothing of this step: their -2 is never written to the cache.
        return forced, logits_state.graphed_parallel(text_token, transformer_out, forced)

    def _all_audio_forced(self, forced: torch.Tensor, exec_mask: torch.Tensor) -> bool:
        # Items that do not execute this step do not matter: their tokens are not kept.
        forced = forced != self.lm_model.ungenerated_token_id
        return bool((forced | ~exec_mask[:, None]).all())

    def _parallel_depformer_logits(self, text_token: torch.Tensor, transformer_out: torch.Tensor,
                                   forced: torch.Tensor) -> torch.Tensor:
        """Depformer logits `[B, dep_q, card]` of a step whose audio tokens `forced [B, dep_q]` are all
        forced, in one call.

        The inputs of the `dep_q` depformer positions are all known (the text token, then the forced
        codebooks), so the causal depformer runs over them at once as in training."""
        lm_model = self.lm_model
        # `forward_depformer_training` reads the text token at index 0 and codebook k - 1 at index k, and
        # expects all the codebooks of the model: the others are padded with the zero token, and unused.
        sequence = torch.full((forced.shape[0], lm_model.num_codebooks), lm_model.zero_token_id,
                              device=forced.device, dtype=torch.long)
        sequence[:, 0] = text_token
        sequence[:, 1:lm_model.dep_q] = forced[:, :-1]
        sequence = sequence[:, :, None]
        if self.cfg_coef != 1.:
            sequence = sequence.repeat(2, 1, 1)
        return self._mix_cfg(lm_model.forward_depformer_training(sequence, transformer_out))[:, :, 0]

    @torch.no_grad()
    def step_with_logits(self, input_tokens: torch.Tensor,
                         forced_tokens: torch.Tensor | None = None) -> StepLogits | None:
        """Streaming steps that also return the text and audio logits of the frames they complete.

        With one frame per call (`[B, K, 1]`), as `StepLogitsLMGen.step_with_logits`. With C > 1 frames,
        `input_tokens [B, n_q - dep_q, C]` and `forced_tokens [B, 1 + dep_q, C]` (frames `s .. s + C - 1`,
        undelayed), it is equivalent to C one-frame calls: it returns the `StepLogits` of every frame those
        calls return, stacked on the time axis (`tokens [B, 1 + dep_q, T']`, `text_logits [B, 1, T',
        text_card_out]`, `audio_logits [B, dep_q, T', card]`, T' <= C: frames `s - max_delay ..`; None when
        none), and leaves the streaming state (KV caches, TTT weights, token cache, offsets) as they would.

        The temporal transformer runs over the chunk in one call. Every audio token the chunk produces must
        be forced (a frame before the start of the stream excepted): its depformer logits then come from one
        parallel call. Text left to the model (-2) needs `use_sampling=False`: the chunk's text tokens are
        guessed, checked against the argmax of each frame, and the frames after a wrong guess run again from
        the last right one (rolling the streaming state back), so the tokens and logits are those of the
        one-frame path (up to float rounding, which could only flip an argmax at an exact near-tie). Chunks
        need `cfg_coef == 1`, no user hooks, every batch item executing, and streaming modules that take
        several frames per call (`moshi_patch.chunking`).
        """
        if self._needs_inference_mode():
            with torch.inference_mode():
                return self.step_with_logits(input_tokens, forced_tokens)
        frames = input_tokens.shape[-1] if isinstance(input_tokens, torch.Tensor) and input_tokens.dim() == 3 else 1
        if frames <= 1:     # No frame: the one-frame path's checks say what was expected.
            return super().step_with_logits(input_tokens, forced_tokens)
        return self._chunk_with_logits(input_tokens, forced_tokens)

    def _chunk_with_logits(self, input_tokens: torch.Tensor,
                           forced_tokens: torch.Tensor | None) -> StepLogits | None:
        state = self._streaming_state
        if state is None:
            raise RuntimeError("step_with_logits must be called inside `with lm_gen.streaming(batch_size):`.")
        lm_model = self.lm_model
        B, C = state.batch_size, input_tokens.shape[-1]
        self._check_chunk_allowed(state)
        input_tokens = self._check_step_tokens("input_tokens", input_tokens, lm_model.n_q - lm_model.dep_q, B, C)
        self._check_token_range("input_tokens", input_tokens, 1 + lm_model.dep_q)
        if forced_tokens is None:
            forced_tokens = torch.full((B, 1 + lm_model.dep_q, C), lm_model.ungenerated_token_id, dtype=torch.long)
        else:
            forced_tokens = self._check_step_tokens("forced_tokens", forced_tokens, 1 + lm_model.dep_q, B, C)
            self._check_token_range("forced_tokens", forced_tokens, 0)
        logits_state = self._step_logits_state()
        self._check_logits_kept(logits_state, C)
        logits_state.any_forced = True    # The chunk writes the ring of forced tokens.
        forced_tokens = forced_tokens.to(lm_model.device)
        plan = self._chunk_plan(input_tokens.to(lm_model.device), forced_tokens)
        if reserve_kv_steps(lm_model, C):
            state.graphed_main.reset()   # Its graph reads the replaced caches.
        transformer_out, text_logits = self._chunk_transformer(plan)
        audio_logits = None
        if lm_model.depformer is not None:
            audio_logits = self._chunk_depformer(plan.written[:, :, -C:], transformer_out)
        out = self._chunk_output(plan, text_logits, audio_logits)
        self._chunk_commit(plan, forced_tokens, text_logits, audio_logits)
        logits_state.offsets = state.offsets
        self.chunk_stats.calls += 1
        self.chunk_stats.frames += C
        return out

    def _check_chunk_allowed(self, state: _LMGenState) -> None:
        if self.lm_model.training:
            raise RuntimeError("lm_model is in training mode: call lm_model.eval() before streaming, "
                               "dropout would make the logits random.")
        if self.cfg_coef != 1.:
            raise ValueError(f"step_with_logits over several frames needs cfg_coef == 1, got {self.cfg_coef}: "
                             "give one frame per call.")
        hooks = [name for name in ("on_text_logits_hook", "on_text_hook", "on_audio_hook")
                 if getattr(self, name) is not None]
        if hooks:
            raise ValueError(f"step_with_logits over several frames does not call the per-step hooks "
                             f"{hooks}: give one frame per call, or unset them.")
        if not bool(state.exec_mask.all()):
            raise ValueError("step_with_logits over several frames needs every batch item to execute "
                             "(set_exec_mask): give one frame per call while some are masked.")
        check_multi_frame_support(self.lm_model)

    def _chunk_plan(self, input_tokens: torch.Tensor, forced_tokens: torch.Tensor) -> _ChunkPlan:
        """The tokens each step of the chunk reads and writes, text left to the model filled with guesses."""
        state = self._streaming_state
        lm_model = self.lm_model
        logits_state: _StepLogitsState = state.step_logits
        B, Km, C = forced_tokens.shape
        D, CT, ring = self.max_delay, state.cache.shape[2], self.max_delay + 1
        ungenerated = lm_model.ungenerated_token_id
        device = forced_tokens.device
        offsets = state.offsets
        steps = torch.arange(C, device=device)
        delays = self.delays_cuda

        # Forced tokens by frame, frames o - D .. o + C - 1: the ring of earlier calls, then this chunk.
        past_frames = offsets[:, None] - D + torch.arange(D, device=device)                    # [B, D]
        past = logits_state.forced.gather(2, (past_frames % ring)[:, None].expand(B, Km, D))
        by_frame = torch.cat([past, forced_tokens], dim=2)                                     # [B, Km, D + C]
        # Step o + j of stream k produces its frame o + j - delay[k].
        produce = (steps[None] - delays[:Km, None] + D)[None].expand(B, Km, C)
        produced = by_frame.gather(2, produce)                                                 # [B, Km, C]
        started = (offsets[:, None, None] + steps - delays[:Km, None]) >= 0
        missing_audio = (produced[:, 1:] == ungenerated) & started[:, 1:]
        text_free = produced[:, 0] == ungenerated
        flags = torch.stack([missing_audio.any(), text_free.any()]).cpu()     # One sync for both checks.
        if flags[0]:
            b, c, j = (int(i) for i in missing_audio.nonzero()[0])
            frame = int(offsets[b]) + j - int(lm_model.delays[1 + c])
            raise ValueError(
                f"step_with_logits over several frames needs every audio token forced, but audio codebook {c} "
                f"of frame {frame} (batch item {b}) is -2 (model's choice): give one frame per call to let "
                "the model sample audio.")
        if flags[1] and self.use_sampling:
            raise ValueError("step_with_logits over several frames can leave the text to the model only with "
                             "use_sampling=False (greedy, checked frame by frame): force the text, or give one "
                             "frame per call.")
        # Guess for the text left to the model: the padding token, what a trained Moshi writes most.
        guess = torch.full_like(produced[:, 0], lm_model.text_padding_token_id)
        produced[:, 0] = torch.where(text_free, guess, produced[:, 0])

        # What the model's streams wrote at steps o - D - 1 .. o - 1: step t wrote position (t + 1) % CT.
        before = (offsets[:, None] - D + torch.arange(D + 1, device=device)) % CT                 # [B, D + 1]
        written = torch.cat([state.cache[:, :Km].gather(2, before[:, None].expand(B, Km, D + 1)), produced], 2)
        # User stream u is read at step t from what step t - delay[u] wrote, at position t % CT.
        user_delays = delays[Km:]
        Ku = user_delays.shape[0]
        past_user = (offsets[:, None, None] + torch.arange(-D, 0, device=device) + user_delays[:, None]) % CT
        user_all = torch.cat([state.cache[:, Km:].gather(2, past_user), input_tokens], dim=2)   # [B, Ku, D + C]
        user = user_all.gather(2, (steps[None] - user_delays[:, None] + D)[None].expand(B, Ku, C))
        is_init = (offsets[:, None, None] + steps) <= delays[:, None]
        return _ChunkPlan(written, user, input_tokens, is_init, text_free, bool(flags[1]))

    def _chunk_input(self, plan: _ChunkPlan, start: int, stop: int) -> torch.Tensor:
        """Input `[B, K, stop - start]` of the temporal transformer at chunk steps `start .. stop - 1`."""
        D = self.max_delay
        # Step j reads what step j - 1 wrote: index j + D of `written`.
        model = plan.written[:, :, D + start: D + stop]
        input_ = torch.cat([model, plan.user[:, :, start:stop]], dim=1)
        return torch.where(plan.is_init[:, :, start:stop], self._streaming_state.initial, input_)

    def _chunk_transformer(self, plan: _ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the temporal transformer over the chunk, checking text guesses (see `step_with_logits`).

        Fills the text of `plan.written` with the model's argmax where it is free. Returns
        `transformer_out [B, C, dim]` and `text_logits [B, C, text_card_out]` of the verified passes.
        """
        state = self._streaming_state
        lm_model = self.lm_model
        stats = self.chunk_stats
        B, _, C = plan.user.shape
        D = self.max_delay
        text = plan.written[:, 0, D + 1:]            # [B, C] view: the text each step writes
        free = plan.text_free
        needs_check = bool(free[:, :-1].any())     # The last step's text feeds no step of this chunk.
        transformer_out: torch.Tensor | None = None
        text_logits: torch.Tensor | None = None
        start = passes = 0
        logits_state: _StreamLogitsState = state.step_logits
        window = C if logits_state.text_window is None else min(logits_state.text_window, C)
        while start < C:
            passes += 1
            if passes > 2 * C + 1:
                # Each pass verifies at least one more frame, unless running frames again from a restored
                # state does not give the same result: some streaming state escaped the snapshot.
                raise RuntimeError(
                    f"text verification of a {C}-frame chunk did not converge after {passes - 1} passes: running "
                    "frames again from the restored streaming state gave other results. A stateful module "
                    "keeps state outside its streaming state; score one frame per call (`--chunk 1`).")
            stop = C if not needs_check else min(C, start + max(1, window))
            snapshot = StreamingSnapshot(lm_model) if needs_check and stop - start > 1 else None
            out, logits = lm_model.forward_text(self._chunk_input(plan, start, stop), state.condition_sum,
                                                state.condition_cross)
            logits = logits[:, 0]
            stats.passes += 1
            if transformer_out is None:
                transformer_out = out.new_empty(B, C, out.shape[-1])
                text_logits = logits.new_empty(B, C, logits.shape[-1])
            assert text_logits is not None
            transformer_out[:, start:stop] = out
            text_logits[:, start:stop] = logits
            if plan.any_text_free:
                argmax = sample_token(logits.float(), False)                              # [B, stop - start]
                wrong = free[:, start:stop - 1] & (text[:, start:stop - 1] != argmax[:, :-1])
                text[:, start:stop] = torch.where(free[:, start:stop], argmax, text[:, start:stop])
            if snapshot is None:      # No guess was read (one step, or no free text).
                window = min(C, 2 * window)
                start = stop
                continue
            checked, num_wrong = (int(n) for n in torch.stack([free[:, start:stop - 1].sum(), wrong.sum()]).cpu())
            stats.guesses += checked
            stats.guesses_right += checked - num_wrong
            if num_wrong == 0:
                window = min(C, 2 * window)
                start = stop
                continue
            wrong_steps = wrong.any(dim=0).nonzero()
            # Steps start .. start + first read right inputs: their outputs are final, and so is the argmax
            # of step start + first. The later steps read a wrong guess: run them again, guessing the argmax
            # they gave (Jacobi), from the state after the right steps.
            right = int(wrong_steps[0]) + 1
            snapshot.restore()
            # A pass of w frames costs about one step plus w chunked frames: passes of about twice the
            # frames a pass gets right keep the cost per frame near one step in the worst case (one right
            # frame per pass), while one early miss only halves the window.
            window = max(2 * right, window // 2, 1)
            if snapshot.positional:
                snapshot.advance(right)       # The KV entries of the right steps were computed right.
                start += right
            else:
                window += right               # The right steps run again, with as many new ones.
        logits_state.text_window = window
        assert transformer_out is not None and text_logits is not None
        return transformer_out, text_logits

    def _chunk_depformer(self, written: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        """Audio logits `[B, dep_q, C, card]` of every chunk step in one depformer call. `written`
        `[B, 1 + dep_q, C]`: the text and audio tokens each step writes (its depformer's inputs)."""
        lm_model = self.lm_model
        B, _, C = written.shape
        sequence = torch.full((B, lm_model.num_codebooks, C), lm_model.zero_token_id,
                              device=written.device, dtype=torch.long)
        # `forward_depformer_training` reads the text at index 0 and codebook k - 1 at index k. Audio not
        # forced is that of a frame before the start of the stream: nobody reads it, feed "no input".
        inputs = written[:, :lm_model.dep_q]
        sequence[:, :lm_model.dep_q] = torch.where(inputs == lm_model.ungenerated_token_id,
                                                   lm_model.zero_token_id, inputs)
        return lm_model.forward_depformer_training(sequence, transformer_out)

    def _chunk_output(self, plan: _ChunkPlan, text_logits: torch.Tensor,
                      audio_logits: torch.Tensor | None) -> StepLogits | None:
        """The frames the chunk's steps return (`s - max_delay` at step `s`), from the rings of the earlier
        steps and the chunk's own logits. Call before `_chunk_commit`."""
        state = self._streaming_state
        lm_model = self.lm_model
        logits_state: _StepLogitsState = state.step_logits
        B, C = text_logits.shape[:2]
        D, ring = self.max_delay, self.max_delay + 1
        first = 0 if self.support_out_of_sync else max(0, D - state.offset_cpu)
        if first >= C:
            return None
        offsets = state.offsets
        batch = logits_state.batch_index[:, None]
        delays = lm_model.delays
        past_steps = offsets[:, None] - D + torch.arange(D, device=offsets.device)             # [B, D]
        # Frame o + j - D of stream k comes from step o + j - D + delay[k]: index j + delay[k] below.
        text_all = torch.cat([logits_state.text_logits[batch, 0, (past_steps - delays[0]) % ring],
                              text_logits.to(logits_state.text_logits.dtype)], dim=1)          # [B, D + C, card]
        text_out = text_all[:, first + delays[0]: C + delays[0]][:, None]
        steps = torch.arange(first, C, device=offsets.device)
        no_frame = (offsets[:, None] + steps) < D                                              # [B, T']
        # Only an item reset within its first `max_delay` steps has no frame here: the NaN copy of the
        # logits ([B, T', 32000] for the text) is made only then (one sync per chunk).
        any_no_frame = bool(no_frame.any())
        if any_no_frame:
            text_out = torch.where(no_frame[:, None, :, None], float('nan'), text_out)
        audio_out = None
        if audio_logits is not None:
            assert logits_state.audio_logits is not None
            per_codebook = []
            for c in range(lm_model.dep_q):
                d = delays[1 + c]
                past = logits_state.audio_logits[batch, c, (past_steps - d) % ring]
                both = torch.cat([past, audio_logits[:, c].to(past.dtype)], dim=1)
                per_codebook.append(both[:, first + d: C + d])
            audio_out = torch.stack(per_codebook, 1)
            if any_no_frame:
                audio_out = torch.where(no_frame[:, None, :, None], float('nan'), audio_out)
        index = (steps[None] + self.delays_cuda[:1 + lm_model.dep_q, None] + 1)[None]
        tokens = plan.written.gather(2, index.expand(B, -1, -1))
        tokens = torch.where(no_frame[:, None], lm_model.ungenerated_token_id, tokens)
        return StepLogits(tokens, text_out, audio_out)

    def _chunk_commit(self, plan: _ChunkPlan, forced_tokens: torch.Tensor, text_logits: torch.Tensor,
                      audio_logits: torch.Tensor | None) -> None:
        """Leaves LMGen's token cache, offsets and rings as the chunk's C one-frame steps would."""
        state = self._streaming_state
        lm_model = self.lm_model
        logits_state: _StepLogitsState = state.step_logits
        B, Km, C = forced_tokens.shape
        CT, ring = state.cache.shape[2], self.max_delay + 1
        offsets = state.offsets
        batch = logits_state.batch_index[:, None]
        # Token cache: only the last CT steps' writes survive. Model streams: step t writes (t + 1) % CT;
        # user stream u: step t writes (t + delay[u]) % CT.
        n = min(C, CT)
        last = torch.arange(C - n, C, device=offsets.device)
        model_pos = ((offsets[:, None] + last + 1) % CT)[:, None].expand(B, Km, n)
        state.cache[:, :Km].scatter_(2, model_pos, plan.written[:, :, -n:])
        user_delays = self.delays_cuda[Km:]
        user_pos = (offsets[:, None, None] + last + user_delays[:, None]) % CT
        state.cache[:, Km:].scatter_(2, user_pos, plan.user_input[:, :, -n:])
        # Rings of forced tokens and logits, by frame: the last `ring` steps of the chunk.
        n = min(C, ring)
        last = torch.arange(C - n, C, device=offsets.device)
        logits_state.forced[batch, :, (offsets[:, None] + last) % ring] = forced_tokens[:, :, -n:].transpose(1, 2)
        text_slots = (offsets[:, None] + last - lm_model.delays[0]) % ring
        logits_state.text_logits[batch, 0, text_slots] = text_logits[:, -n:].to(logits_state.text_logits.dtype)
        if audio_logits is not None:
            assert logits_state.audio_logits is not None
            for c in range(lm_model.dep_q):
                slots = (offsets[:, None] + last - lm_model.delays[1 + c]) % ring
                logits_state.audio_logits[batch, c, slots] = audio_logits[:, c, -n:].to(
                    logits_state.audio_logits.dtype)
        state.offsets = offsets + C
        state.offset_cpu += C
