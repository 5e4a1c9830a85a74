"""Streaming several frames per call: KV caches wide enough for a chunk, and rollback of streaming state.

`LMGen.step_with_logits` runs a chunk of C frames through the temporal transformer in one streaming call.
Three things about moshi's streaming modules make that exact, and are handled here:

- Moshi's `RingKVCache` holds exactly `context` steps. A call of C steps writes its C keys before its first
  query attends, so once the cache is full it overwrites keys that query still needs. `reserve_kv_steps`
  gives every self-attention cache `context + C` slots, keeping what it holds; the attention mask still
  limits each query to `context` steps, so nothing else changes.
- A chunk whose text is the model's own argmax is computed from guesses and checked (`LMGen`); a wrong
  guess means running part of the chunk again from an earlier state. `StreamingSnapshot` takes the
  state of every streaming module (tensors cloned, counters copied) and puts it back in place, so that
  CUDA graphs that captured those tensors stay valid. KV caches are not copied: moving their end offset
  back is enough, because a slot written past it is either written again before it is read, or holds a
  position at least `context` steps older than any query (that is why the caches get `context + C`).
- A streaming module must compute the same thing whether it is given one frame or several per call.
  Moshi's attention and transformer layers do; `TTTLinear` does; any other streaming module must declare
  it with a class attribute `supports_multi_frame_streaming = True`, else chunking stops with an error
  that names it (`check_multi_frame_support`).
"""
from dataclasses import dataclass
import typing as tp

import torch
from moshi.modules.streaming import State, StreamingContainer, StreamingModule
from moshi.modules.transformer import (RingKVCache, StreamingMultiheadAttention, StreamingTransformer,
                                       StreamingTransformerLayer, _LayerState, _MHAState, _TransformerState)
from moshi.utils.compile import CUDAGraphed

__all__ = ["MultiFrameStreamingError", "StreamingSnapshot", "check_multi_frame_support", "reserve_kv_steps"]

# Streaming modules of moshi known to give the same result for one or several frames per call.
_MULTI_FRAME_MODULES = (StreamingMultiheadAttention, StreamingTransformerLayer, StreamingTransformer,
                        StreamingContainer)
# States whose whole content is a position (and a KV cache): moving them n frames forward is adding n.
_POSITIONAL_STATES = (_MHAState, _LayerState, _TransformerState, State)
# Fields of `State` itself that describe the state rather than hold it.
_STATE_META_FIELDS = ("batch_size", "device", "_set_exec_mask_graphed", "exit_stack", "reset_callback",
                      "set_exec_mask_callback")


class MultiFrameStreamingError(RuntimeError):
    """A streaming module that cannot take several frames per call, or whose state cannot be rolled back."""


def _streaming_states(module: StreamingModule) -> dict[str, State]:
    """The live streaming state of `module` and of its streaming children, by name ("" for itself)."""
    return {name: state for name, state in module.get_streaming_state().items() if state is not None}


def _streaming_modules(module: StreamingModule) -> dict[str, StreamingModule]:
    found: dict[str, StreamingModule] = {}
    module._apply_named_streaming(lambda name, child: found.__setitem__(name, child))
    return found


def check_multi_frame_support(module: StreamingModule) -> None:
    """Raise `MultiFrameStreamingError` naming the first streaming module (in streaming mode) of `module`
    not known to compute the same for several frames per call as for one."""
    for name, child in _streaming_modules(module).items():
        if child._streaming_state is None:
            continue
        if isinstance(child, StreamingMultiheadAttention) and child.weights_per_step:
            reason = "attention with weights per step uses one weight per call, not per frame"
        elif isinstance(child, _MULTI_FRAME_MODULES) or getattr(child, "supports_multi_frame_streaming", False):
            continue
        else:
            reason = ("it does not declare `supports_multi_frame_streaming = True`, so it may compute something "
                      "else when given several frames per call")
        raise MultiFrameStreamingError(
            f"streaming module {name or '<root>'} ({type(child).__name__}) cannot be given several frames per "
            f"call: {reason}. Score one frame per call (`--chunk 1`, or input tokens of one frame).")


def _kv_slot_positions(cache: RingKVCache, batch_size: int) -> torch.Tensor:
    """[B, capacity] absolute position held by each slot of `cache` (negative: never written)."""
    end = cache.end_offset.view(-1, 1).expand(batch_size, 1)
    slots = torch.arange(cache.capacity, device=end.device)
    # The latest position p < end with p % capacity == slot.
    return end - 1 - (end - 1 - slots) % cache.capacity


def _widen(cache: RingKVCache, capacity: int) -> RingKVCache:
    """A copy of `cache` with `capacity` slots holding the same positions (each at `position % capacity`)."""
    _, B, H, _, D = cache.cache.shape
    wide = RingKVCache(B, H, D, capacity, respect_exec_mask=cache.respect_exec_mask,
                       device=cache.cache.device, dtype=cache.cache.dtype)
    if not bool((cache.end_offset > 0).any()):
        return wide         # Nothing written yet (the usual case: widened before the first chunk).
    wide.end_offset.copy_(cache.end_offset)
    # Slot j of the wide cache holds position p_j, the latest p < end with p % capacity == j; it is in the
    # old cache if it is one of its last `cache.capacity` positions. Older ones are never attended to again
    # (further back than `context`), and stay zero.
    positions = _kv_slot_positions(wide, B)                                      # [B, capacity]
    held = (positions >= 0) & (positions >= wide.end_offset.view(-1, 1) - cache.capacity)
    old_slot = (positions % cache.capacity).clamp_min(0)
    index = old_slot[None, :, None, :, None].expand(2, B, H, capacity, D)
    values = cache.cache.gather(3, index)
    wide.cache.copy_(torch.where(held[None, :, None, :, None], values, torch.zeros_like(values)))
    return wide


def reserve_kv_steps(module: StreamingModule, steps: int) -> bool:
    """Give every streaming self-attention KV cache of `module` at least `context + steps` slots.

    Call it before a streaming call of `steps` frames. Returns True if a cache was replaced: a CUDA graph
    captured on the old cache must then be captured again (`CUDAGraphed.reset()`).
    """
    replaced = False
    for child in _streaming_modules(module).values():
        state = child._streaming_state
        if not isinstance(child, StreamingMultiheadAttention) or state is None or child.context is None:
            continue
        cache = state.kv_cache
        if cache is None or cache.capacity >= child.context + steps:
            continue
        state.kv_cache = _widen(cache, child.context + steps)
        replaced = True
    return replaced


@dataclass
class _SavedState:
    state: State
    tensors: dict[str, torch.Tensor]
    values: dict[str, tp.Any]
    kv_end_offsets: dict[str, torch.Tensor]


class StreamingSnapshot:
    """The streaming state of a module and its children at one moment, to go back to it.

    `restore()` writes the saved tensors back in place (CUDA graphs keep reading the same buffers) and
    resets the counters. KV caches are restored by their end offset only (see the module docstring).
    Raises `MultiFrameStreamingError` for a state field it does not know how to save.
    """

    def __init__(self, module: StreamingModule) -> None:
        self._saved: list[_SavedState] = []
        for name, state in _streaming_states(module).items():
            tensors: dict[str, torch.Tensor] = {}
            values: dict[str, tp.Any] = {}
            kv: dict[str, torch.Tensor] = {}
            for field_name, value in vars(state).items():
                if field_name in _STATE_META_FIELDS or isinstance(value, CUDAGraphed):
                    continue
                if isinstance(value, torch.Tensor):
                    tensors[field_name] = value.clone()
                elif isinstance(value, RingKVCache):
                    kv[field_name] = value.end_offset.clone()
                elif value is None or isinstance(value, (bool, int, float, str)):
                    values[field_name] = value
                else:
                    raise MultiFrameStreamingError(
                        f"cannot roll back the streaming state of {name or '<root>'} ({type(state).__name__}): "
                        f"field {field_name!r} is a {type(value).__name__}. Score one frame per call "
                        "(`--chunk 1`), or force the text stream.")
            self._saved.append(_SavedState(state, tensors, values, kv))
        # True when every state is a position: `advance` can then stand for running frames again.
        self.positional = all(type(saved.state) in _POSITIONAL_STATES for saved in self._saved)

    def restore(self) -> None:
        for saved in self._saved:
            for field_name, value in saved.tensors.items():
                current = getattr(saved.state, field_name)
                if isinstance(current, torch.Tensor) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    setattr(saved.state, field_name, value.clone())
            for field_name, value in saved.values.items():
                setattr(saved.state, field_name, value)
            for field_name, end_offset in saved.kv_end_offsets.items():
                getattr(saved.state, field_name).end_offset.copy_(end_offset)

    def advance(self, frames: int) -> None:
        """After `restore()`, move a positional state (`self.positional`) `frames` frames forward, keeping
        what the KV caches hold: the state of having run those frames, if the keys they wrote are right."""
        if not self.positional:
            raise MultiFrameStreamingError("advance: the streaming state is not only positions (e.g. TTT "
                                           "weights): run the frames again instead.")
        for saved in self._saved:
            state = saved.state
            if isinstance(state, _MHAState):
                state.offset.add_(frames)
                state.offset_cpu += frames
                if state.kv_cache is not None:
                    state.kv_cache.end_offset.add_(frames)
            elif isinstance(state, _LayerState):
                state.offset_cpu += frames
            elif isinstance(state, _TransformerState):
                state.offsets.add_(frames)
