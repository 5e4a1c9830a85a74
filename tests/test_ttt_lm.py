"""LMModel with TTT layers: `step_with_logits` sees the TTT-updated state (DESIGN.md section 4, oracle 3).

Teacher-forced and replay equivalence with `LMModel.forward`; the inner weights move during a stream; past
the attention window only the TTT state remembers the prefix; and the old workaround (each step from a fresh
TTT state) measures a different model.
"""
import pytest
import torch

from moshi_eval.scoring.streaming import teacher_forced_logits
from moshi_patch import LMGen, TeacherForcing
from moshi_patch.ttt import ttt_layers

from helpers.lm_factory import assert_close, make_lm, random_codes, stream_teacher_forced, ttt_lm

TOL = 1e-4


def _lm(context: int = 8, ttt: bool = True, **kwargs):
    """The tests' TTT model (TTT blocks after both temporal layers) or, with `ttt=False`, the same without."""
    return ttt_lm(context=context, **kwargs) if ttt else make_lm(context=context)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(max_delay=2, depformer_multi_linear=True, depformer_weights_per_step=True),
])
def test_teacher_forced_streaming_equals_forward_with_ttt(kwargs):
    lm = _lm(**kwargs)                   # context 8 < 30 frames: the KV ring buffer wraps
    codes = random_codes(lm, 2, 30)
    text, audio = teacher_forced_logits(lm, codes)
    with torch.no_grad():
        ref = lm(codes)
    assert_close(text, ref.text_logits, ref.text_mask)
    assert_close(audio, ref.logits, ref.mask)


@pytest.mark.parametrize("use_sampling", [False, True])
def test_replay_with_ttt(use_sampling):
    """Nothing forced: feeding the generated tokens back to LMModel.forward reproduces the logits."""
    lm = _lm()
    B, T = 2, 24
    user = random_codes(lm, B, T)[:, lm.dep_q + 1:]
    lm_gen = LMGen(lm, use_sampling=use_sampling, temp=1.0, top_k=0)
    torch.manual_seed(11)
    tokens, text, audio = [], [], []
    with lm_gen.streaming(B):
        for step in range(T + lm_gen.max_delay):
            out = lm_gen.step_with_logits(user[:, :, max(min(step - 1, T - 1), 0), None])
            if out is not None:
                tokens.append(out.tokens[..., 0])
                text.append(out.text_logits[:, :, 0])
                audio.append(out.audio_logits[:, :, 0])
    own = torch.stack(tokens, dim=2)[:, :, :T]
    codes = torch.cat([own, user], dim=1)
    with torch.no_grad():
        ref = lm(codes)
    assert_close(torch.stack(text, 2)[:, :, :T], ref.text_logits, ref.text_mask)
    assert_close(torch.stack(audio, 2)[:, :, :T], ref.logits, ref.mask)


def test_inner_weights_change_during_a_stream():
    lm = _lm(mini_batch_size=4)
    codes = random_codes(lm, 2, 12)
    lm_gen = LMGen(lm, use_sampling=False)
    plan = TeacherForcing(lm, codes[:, 1:1 + lm.dep_q], text=codes[:, 0], user=codes[:, lm.dep_q + 1:])
    with lm_gen.streaming(2):
        states = [block._streaming_state for block in ttt_layers(lm)]
        history = []
        for step in range(12):
            lm_gen.step_with_logits(*plan.inputs(step))
            history.append([state.w.clone() for state in states])
        for i, state in enumerate(states):
            # W0 moves exactly at the end of each mini-batch of 4 frames, for every item.
            moved = [not torch.equal(history[s][i], history[s - 1][i]) for s in range(1, 12)]
            assert moved == [s % 4 == 3 for s in range(1, 12)]
            assert (state.w - state.init_w).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def beyond_window_gap(ttt: bool) -> tuple[float, float]:
    """Two streams with different prefixes and the same suffix. Returns the max |diff| of their logits over
    the first suffix frames (the prefix is still in the attention window) and over the later suffix frames
    whose whole receptive field through the attention window lies inside the suffix."""
    context, prefix_len, suffix_len = 3, 20, 20
    lm = _lm(context=context, ttt=ttt, mini_batch_size=4)
    a = random_codes(lm, 1, prefix_len + suffix_len, seed=1)
    b = random_codes(lm, 1, prefix_len, seed=2)
    text_a, audio_a = teacher_forced_logits(lm, a)
    text_b, audio_b = teacher_forced_logits(lm, torch.cat([b, a[:, :, prefix_len:]], dim=2))

    def gap(frames: slice) -> float:
        return max(float((text_a - text_b)[:, :, frames].abs().max()),
                   float((audio_a - audio_b)[:, :, frames].abs().max()))

    # Each of the 2 attention layers reaches `context` frames back; the delay and the user shift add 2.
    start = prefix_len + 2 * context + 2
    # The last frame of the delayed codebooks has no logits (invalid in forward too): stop before it.
    return gap(slice(prefix_len, prefix_len + 2)), gap(slice(start, prefix_len + suffix_len - 1))


def test_ttt_state_carries_the_prefix_beyond_the_attention_window():
    near_plain, far_plain = beyond_window_gap(ttt=False)
    near_ttt, far_ttt = beyond_window_gap(ttt=True)
    assert near_plain > 1e-2 and near_ttt > 1e-2    # inside the window, the prefix shows in both
    assert far_plain < 1e-6          # KV cache only: the prefix is forgotten once out of the window
    assert far_ttt > 10 * TOL        # the TTT inner weights still hold it (measured 3.9e-2)


def test_fresh_state_workaround_measures_another_model():
    """Resetting the TTT state before every step (what a logits pass that does not carry the streaming
    state amounts to) gives logits far from LMModel.forward, while step_with_logits matches it."""
    lm = _lm()
    B, T = 2, 24
    codes = random_codes(lm, B, T)
    with torch.no_grad():
        ref = lm(codes)
    # Before every step (one frame per call), each TTT block starts from its initial inner weights.
    handles = [block.register_forward_pre_hook(
        lambda module, args: module._streaming_state.reset(torch.ones(B, dtype=torch.bool)))
        for block in ttt_layers(lm)]
    try:
        fresh_text, fresh_audio, _ = stream_teacher_forced(LMGen(lm, use_sampling=False), codes)
    finally:
        for handle in handles:
            handle.remove()
    gap = (fresh_audio - ref.logits).abs()[ref.mask]
    text_gap = (fresh_text - ref.text_logits).abs()[ref.text_mask]
    # Measured: audio max 5.7e-2, mean 6.4e-3; text max 9.1e-2, mean 1.0e-2 (step_with_logits: ~1e-6).
    assert gap.max() > 100 * TOL and gap.mean() > 10 * TOL
    assert text_gap.max() > 100 * TOL and text_gap.mean() > 10 * TOL
    streamed_text, streamed_audio = teacher_forced_logits(lm, codes)
    assert_close(streamed_audio, ref.logits, ref.mask)
    assert_close(streamed_text, ref.text_logits, ref.text_mask)


def test_exec_mask_and_reset_with_ttt():
    """Item 1 is paused for 3 steps across a mini-batch end, after a reset of item 0 alone: each item's
    logits still equal LMModel.forward on its own codes."""
    lm = _lm(mini_batch_size=4)
    dep_q, T = lm.dep_q, 12
    codes = random_codes(lm, 2, T, seed=4)
    other = random_codes(lm, 2, 5, seed=5)
    with torch.no_grad():
        ref = lm(codes)
    paused = {3, 4, 5}
    lm_gen = LMGen(lm, use_sampling=False)
    per_item: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    frame_of = [0, 0]
    before = TeacherForcing(lm, other[:, 1:1 + dep_q], text=other[:, 0], user=other[:, dep_q + 1:])
    plan = TeacherForcing(lm, codes[:, 1:1 + dep_q], text=codes[:, 0], user=codes[:, dep_q + 1:])
    with lm_gen.streaming(2):
        for step in range(5):      # item 0 has a history that a reset must erase; item 1 starts now
            lm_gen.set_exec_mask(torch.tensor([True, False]))
            lm_gen.step_with_logits(*before.inputs(step))
        lm_gen.reset_streaming(torch.tensor([True, False]))
        for step in range(T + len(paused) + lm_gen.max_delay):
            mask = torch.tensor([True, step not in paused])
            lm_gen.set_exec_mask(mask)
            # Each item gets the tokens of its own step (a paused item does not advance).
            inputs = [plan.inputs(min(frame_of[b], plan.num_steps - 1)) for b in range(2)]
            user, forced = (torch.stack([inputs[b][i][b] for b in range(2)]) for i in range(2))
            out = lm_gen.step_with_logits(user, forced)
            for b in range(2):
                if out is not None and mask[b] and frame_of[b] >= lm_gen.max_delay:
                    per_item[b].append(out.audio_logits[b, :, 0])
                frame_of[b] += int(mask[b])
    for b in range(2):
        got = torch.stack(per_item[b][:T], dim=1)                     # [dep_q, T, card]
        assert_close(got[None], ref.logits[b:b + 1], ref.mask[b:b + 1])
