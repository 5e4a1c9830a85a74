# moshi-patch: LMGen.step_with_logits, written to read as part of moshi/models/lm.py.
#
# Everything between an `# upstream-begin: <place>` and the matching `# upstream-end` line is inserted
# verbatim into moshi/models/lm.py by `python -m moshi_patch.upstream` (the pull request): that code only
# uses names that moshi/models/lm.py itself defines or imports.
"""Moshi's `LMGen` with `step_with_logits`: the logits of each streaming step.

Frame convention (the one of `LMModel.forward` codes and of what `LMGen.step` returns): at streaming step
`s` (0-based), stream `k` produces its frame `s - delays[k]`; `step` returns frame `s - max_delay` of every
model stream (None while `s < max_delay`). `step_with_logits` takes the forced tokens of frame `s`,
undelayed, schedules each stream by its delay, and returns the tokens and logits of frame `s - max_delay`.
"""
from dataclasses import dataclass

import torch

from moshi.models import lm as _upstream
from moshi.utils.compile import CUDAGraphed
from moshi.utils.sampling import sample_token

__all__ = ["LMGen", "StepLogits"]


# upstream-begin: module
@dataclass
class StepLogits:
    """Output of `LMGen.step_with_logits`: the tokens of one frame and the logits they came from.

    All three belong to the same frame: `s - max_delay` at step `s`. The logits are taken after CFG mixing,
    are copies that stay valid after the next step, and keep the model's dtype (cast them to float32 before
    a cross-entropy). The logits of a batch item that returned no frame (masked by `set_exec_mask`, or still
    in its first `max_delay` steps after a reset) are NaN.
    """

    tokens: torch.Tensor  # [B, 1 + dep_q, 1], exactly what `step()` returns at this step.
    text_logits: torch.Tensor  # [B, 1, 1, text_card_out]
    audio_logits: torch.Tensor | None  # [B, dep_q, 1, card], None for a model without depformer.


@dataclass
class _StepLogitsState:
    """Buffers of `LMGen.step_with_logits`, living as long as the streaming state.

    Because of the delays, the forced tokens of a frame are used up to `max_delay` steps after they were
    given, and the logits of a frame are complete `max_delay` steps after the first of them was computed.
    Both are kept in rings of `max_delay + 1` frames, indexed per batch item by `frame % (max_delay + 1)`.
    A masked item (`set_exec_mask`) does not advance, so whatever a masked step writes lands in the slots of
    the item's current frame, which its next executed step writes again.
    """

    batch_index: torch.Tensor  # [B], arange(B), to index the rings per item.
    codebook_index: torch.Tensor  # [dep_q], arange(dep_q), to index the audio ring per codebook.
    forced: torch.Tensor  # [B, 1 + dep_q, max_delay + 1], forced tokens by frame, -2 where not forced.
    text_logits: torch.Tensor  # [B, 1, max_delay + 1, text_card_out], text logits by frame.
    audio_logits: torch.Tensor | None  # [B, dep_q, max_delay + 1, card], audio logits by frame.
    # Static input and output of the depformer functions, which may be CUDA graphed: the tokens to force
    # at this step ([B, dep_q], -2 for the model's choice) and the logits computed ([B, dep_q, card]).
    depth_forced: torch.Tensor | None
    depth_logits: torch.Tensor | None
    graphed_depth: CUDAGraphed | None  # `_depformer_step_with_logits`: dep_q sequential calls.
    graphed_depth_forced: CUDAGraphed | None  # `_depformer_forced_with_logits`: one parallel call.
    # Until tokens are forced for the first time, the forced ring holds only -2 and is not maintained.
    any_forced: bool = False
# upstream-end


class LMGen(_upstream.LMGen):
    """`moshi.models.lm.LMGen` with `step_with_logits`. `step` and every other method are unchanged."""

    def _init_streaming_state(self, batch_size: int) -> _upstream._LMGenState:
        state = super()._init_streaming_state(batch_size)
        # upstream-begin: init_streaming_state
        state.step_logits = self._init_step_logits_state(state.batch_size)
        # upstream-end
        return state

    # upstream-begin: LMGen
    # When every audio token of a step is forced, `step_with_logits` computes the depformer logits with one
    # parallel call instead of `dep_q` sequential ones (same logits). Set to False to always go sequential.
    parallel_forced_depformer: bool = True

    def _init_step_logits_state(self, batch_size: int) -> _StepLogitsState:
        lm_model = self.lm_model
        device, dtype = lm_model.device, lm_model.dtype
        ring = self.max_delay + 1
        forced = torch.full((batch_size, 1 + lm_model.dep_q, ring), lm_model.ungenerated_token_id,
                            device=device, dtype=torch.long)
        text_logits = torch.full((batch_size, 1, ring, lm_model.text_linear.out_features), float('nan'),
                                 device=device, dtype=dtype)
        audio_logits = depth_forced = depth_logits = graphed_depth = graphed_depth_forced = None
        if lm_model.depformer is not None:
            audio_logits = torch.full((batch_size, lm_model.dep_q, ring, lm_model.card), float('nan'),
                                      device=device, dtype=dtype)
            depth_forced = forced[:, 1:, 0].clone()
            depth_logits = audio_logits[:, :, 0].clone()
            disable = device.type != 'cuda'
            graphed_depth = CUDAGraphed(self._depformer_step_with_logits, disable=disable)
            graphed_depth_forced = CUDAGraphed(self._depformer_forced_with_logits, disable=disable)
        batch_index = torch.arange(batch_size, device=device)
        codebook_index = torch.arange(lm_model.dep_q, device=device)
        return _StepLogitsState(batch_index, codebook_index, forced, text_logits, audio_logits,
                                depth_forced, depth_logits, graphed_depth, graphed_depth_forced)

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
        input_tokens = input_tokens.to(lm_model.device)
        logits_state: _StepLogitsState = state.step_logits
        if forced_tokens is not None:
            forced_tokens = self._check_step_tokens("forced_tokens", forced_tokens, 1 + lm_model.dep_q, B)
            self._check_forced_range(forced_tokens)  # Before the copy to the device: no sync for CPU tokens.
            forced_tokens = forced_tokens.to(lm_model.device)
            logits_state.any_forced = True

        # `_step` replaces `state.offsets` by a new tensor, so this one keeps the frame of each item.
        offsets = state.offsets
        ring = self.max_delay + 1
        # Frame produced at this step by each of the model's streams, and its slot in the rings.
        frames = offsets[:, None] - self.delays_cuda[None, :1 + lm_model.dep_q]
        slots = frames % ring

        forced_now: torch.Tensor | None = None
        depth_fn = logits_state.graphed_depth
        if logits_state.any_forced:
            if forced_tokens is None:
                forced_tokens = logits_state.forced[:, :, :1].clone().fill_(lm_model.ungenerated_token_id)
            logits_state.forced[logits_state.batch_index, :, offsets % ring] = forced_tokens[:, :, 0]
            forced_now = logits_state.forced.gather(2, slots[:, :, None])[:, :, 0]
            # Frames before the start of the stream are never seen by the model: nothing to force there.
            forced_now = torch.where(frames >= 0, forced_now, lm_model.ungenerated_token_id)
            if lm_model.depformer is not None:
                logits_state.depth_forced.copy_(forced_now[:, 1:])
                if self.parallel_forced_depformer and self._all_audio_forced(forced_now, state.exec_mask):
                    depth_fn = logits_state.graphed_depth_forced

        # `_step` is reused as is: the hooks record the text logits and force the text token, and the
        # depformer function, swapped in for this step, forces the audio tokens and keeps their logits.
        user_text_hook, user_text_logits_hook = self.on_text_hook, self.on_text_logits_hook

        def on_text_logits(text_logits: torch.Tensor) -> None:
            logits_state.text_logits[logits_state.batch_index, 0, slots[:, 0]] = (
                text_logits[:, 0, 0].to(logits_state.text_logits.dtype))
            if user_text_logits_hook is not None:
                user_text_logits_hook(text_logits)

        def on_text(text_token: torch.Tensor) -> None:
            if forced_now is not None:
                forced_text = forced_now[:, 0]
                text_token.copy_(torch.where(forced_text == lm_model.ungenerated_token_id,
                                             text_token, forced_text))
            if user_text_hook is not None:
                user_text_hook(text_token)

        graphed_depth = state.graphed_depth
        if graphed_depth is not None:
            state.graphed_depth = depth_fn
        self.on_text_logits_hook, self.on_text_hook = on_text_logits, on_text
        try:
            out = self._step(input_tokens)
        finally:
            state.graphed_depth = graphed_depth
            self.on_text_hook, self.on_text_logits_hook = user_text_hook, user_text_logits_hook

        if logits_state.audio_logits is not None:
            ring_index = (logits_state.batch_index[:, None], logits_state.codebook_index, slots[:, 1:])
            logits_state.audio_logits[ring_index] = logits_state.depth_logits.to(logits_state.audio_logits.dtype)
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
                           batch_size: int) -> torch.Tensor:
        expected = f"[{batch_size}, {num_streams}, 1] (batch size, streams, one frame)"
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
        if tuple(tokens.shape[1:]) != (num_streams, 1):
            raise ValueError(f"{name} must have shape {expected}, got {list(tokens.shape)}.")
        return tokens.long()

    def _check_forced_range(self, forced_tokens: torch.Tensor) -> None:
        lm_model = self.lm_model
        cards = torch.full((1 + lm_model.dep_q,), lm_model.card, device=forced_tokens.device)
        cards[0] = lm_model.text_card
        bad = (forced_tokens < lm_model.ungenerated_token_id) | (forced_tokens >= cards[None, :, None])
        if bad.any():
            b, k, t = (int(i) for i in bad.nonzero()[0])
            stream = "text" if k == 0 else f"audio codebook {k - 1}"
            raise ValueError(
                f"forced_tokens[{b}, {k}, {t}] = {int(forced_tokens[b, k, t])} is out of range for stream {k} "
                f"({stream}): expected -2 (model's choice), -1 (no input) or a token in [0, {int(cards[k])}).")

    def _all_audio_forced(self, forced_now: torch.Tensor, exec_mask: torch.Tensor) -> bool:
        # Items that do not execute this step do not matter: their tokens are not kept.
        forced = forced_now[:, 1:] != self.lm_model.ungenerated_token_id
        return bool((forced | ~exec_mask[:, None]).all())

    def _mix_cfg(self, logits: torch.Tensor) -> torch.Tensor:
        # Same mixing as `depformer_step`: [2 * B, ...] conditioned then unconditioned -> [B, ...].
        if self.cfg_coef == 1.:
            return logits
        logits, logits_null = logits.chunk(2)
        return logits_null + (logits - logits_null) * self.cfg_coef

    def _depformer_step_with_logits(self, text_token: torch.Tensor,
                                    transformer_out: torch.Tensor) -> torch.Tensor:
        """`depformer_step` that forces the tokens of `depth_forced` and keeps the logits in `depth_logits`.

        Tokens not forced are sampled exactly as `depformer_step` samples them. Returns `[B, dep_q]`.
        """
        logits_state: _StepLogitsState = self._streaming_state.step_logits
        lm_model = self.lm_model
        B, = text_token.shape
        cfg_factor = 1 if self.cfg_coef == 1. else 2
        prev_token = text_token
        tokens: list[torch.Tensor] = []
        logits_per_codebook: list[torch.Tensor] = []
        with lm_model.depformer.streaming(B * cfg_factor):
            for cb_index in range(lm_model.dep_q):
                input_ = prev_token[:, None, None]
                if cfg_factor > 1:
                    input_ = input_.repeat(cfg_factor, 1, 1)
                logits = self._mix_cfg(lm_model.forward_depformer(cb_index, input_, transformer_out))
                sampled = sample_token(logits.float(), self.use_sampling, self.temp, self.top_k)[:, 0, 0]
                forced = logits_state.depth_forced[:, cb_index]
                prev_token = torch.where(forced == lm_model.ungenerated_token_id, sampled, forced)
                tokens.append(prev_token)
                logits_per_codebook.append(logits[:, 0, 0])
        logits_state.depth_logits.copy_(torch.stack(logits_per_codebook, dim=1))
        return torch.stack(tokens, dim=1)

    def _depformer_forced_with_logits(self, text_token: torch.Tensor,
                                      transformer_out: torch.Tensor) -> torch.Tensor:
        """Depformer logits in one parallel call, for a step where every audio token is forced.

        The inputs of the `dep_q` depformer positions are all known (the text token, then the forced
        codebooks), so the causal depformer runs over them at once as in training, instead of `dep_q`
        streaming calls. Returns the forced tokens `[B, dep_q]` and keeps the logits in `depth_logits`.
        """
        logits_state: _StepLogitsState = self._streaming_state.step_logits
        lm_model = self.lm_model
        forced = logits_state.depth_forced
        # `forward_depformer_training` reads the text token at index 0 and codebook k - 1 at index k, and
        # expects all the codebooks of the model: the others are padded with the zero token, and unused.
        sequence = torch.full((forced.shape[0], lm_model.num_codebooks), lm_model.zero_token_id,
                              device=forced.device, dtype=torch.long)
        sequence[:, 0] = text_token
        sequence[:, 1:lm_model.dep_q] = forced[:, :-1]
        cfg_factor = 1 if self.cfg_coef == 1. else 2
        sequence = sequence[:, :, None]
        if cfg_factor > 1:
            sequence = sequence.repeat(cfg_factor, 1, 1)
        logits = self._mix_cfg(lm_model.forward_depformer_training(sequence, transformer_out))
        logits_state.depth_logits.copy_(logits[:, :, 0])
        return forced
    # upstream-end
