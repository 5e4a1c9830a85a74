"""`step_with_logits` over chunks of frames against independent computations: `LMModel.forward` on the same
codes, the one-frame path (C = 1) on the same stream, and a replay of its text tokens."""
import pytest
import torch

from moshi.modules.streaming import State, StreamingModule
from moshi_patch import LMGen, TeacherForcing
from moshi_patch.chunking import MultiFrameStreamingError
from moshi_patch.ttt import TTTLinear

from helpers.lm_factory import assert_close, make_lm, random_codes, stream_teacher_forced, ttt_lm


def chunk_inputs(lm, codes: torch.Tensor, start: int, frames: int, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """User tokens `[B, Ku, frames]` and forced tokens `[B, 1 + dep_q, frames]` of steps `start ..` that
    teacher force `codes [B, K, T]`, the text forced to the codes (`text="forced"`) or left to the model
    (`"predicted"`)."""
    plan = TeacherForcing(lm, codes[:, 1:1 + lm.dep_q], text=codes[:, 0] if text == "forced" else text,
                          user=codes[:, 1 + lm.dep_q:])
    return plan.inputs(start, frames)


def stream(lm_gen: LMGen, codes: torch.Tensor, schedule: list[int], text: str = "forced"):
    """Streams `codes` through `step_with_logits` with calls of `schedule[i]` frames (the last one repeated
    until `T + max_delay` steps). Returns text logits, audio logits and tokens of frames 0 .. T - 1."""
    text_logits, audio_logits, tokens = stream_teacher_forced(lm_gen, codes, schedule,
                                                              None if text == "forced" else text)
    assert text_logits.shape[2] == codes.shape[2]
    return text_logits, audio_logits, tokens


MODELS = {
    "delay_2_wrap": lambda: make_lm(n_q=6, dep_q=3, max_delay=2, context=5),
    "ttt": lambda: ttt_lm(n_q=6, dep_q=3, max_delay=2, context=5, mini_batch_size=3),
}


@pytest.mark.parametrize("chunk", [2, 3, 7, 20])   # 20 > context (5): the KV ring buffer wraps in a call
@pytest.mark.parametrize("model", list(MODELS))
def test_text_forced_chunks_equal_forward_and_one_frame(model: str, chunk: int) -> None:
    lm = MODELS[model]()
    codes = random_codes(lm, 2, 17)
    reference = lm(codes)
    text, audio, tokens = stream(LMGen(lm, use_sampling=False), codes, [chunk])
    assert_close(audio, reference.logits, reference.mask)
    assert_close(text, reference.text_logits, reference.text_mask)
    assert torch.equal(tokens, codes[:, :1 + lm.dep_q])
    one_text, one_audio, _ = stream(LMGen(lm, use_sampling=False), codes, [1])
    assert_close(audio, one_audio, reference.mask)


@pytest.mark.parametrize("chunk", [2, 3, 7, 20])
@pytest.mark.parametrize("model", list(MODELS))
def test_predicted_text_chunks_equal_one_frame_and_replay(model: str, chunk: int) -> None:
    lm = MODELS[model]()
    codes = random_codes(lm, 2, 17, seed=4)
    one_text, one_audio, one_tokens = stream(LMGen(lm, use_sampling=False), codes, [1], "predicted")
    lm_gen = LMGen(lm, use_sampling=False)
    text, audio, tokens = stream(lm_gen, codes, [chunk], "predicted")
    assert torch.equal(tokens, one_tokens)
    assert_close(text, one_text)
    assert_close(audio, one_audio)
    # Replay: the model's own text tokens in place of the codes' text give the same logits in one forward.
    replay = codes.clone()
    replay[:, 0] = tokens[:, 0]
    reference = lm(replay)
    assert_close(audio, reference.logits, reference.mask)
    assert torch.equal(tokens[:, 0], text[:, 0].argmax(-1))
    stats = lm_gen.chunk_stats
    assert stats.calls > 0 and stats.passes >= stats.calls and stats.guesses > 0


def test_state_continues_across_chunks_and_single_frames() -> None:
    """Chunks, then one-frame calls, then chunks again (the KV caches are widened mid-stream, keeping what
    they hold): the same as one frame per call throughout."""
    lm = ttt_lm(n_q=6, dep_q=3, max_delay=2, context=6, mini_batch_size=3)
    codes = random_codes(lm, 2, 40, seed=8)
    schedule = [4, 5, 1, 1, 1, 3, 1, 9, 2, 1, 7]
    for text_mode in ("forced", "predicted"):
        one = stream(LMGen(lm, use_sampling=False), codes, [1], text_mode)
        mixed = stream(LMGen(lm, use_sampling=False), codes, schedule, text_mode)
        assert torch.equal(mixed[2], one[2])
        assert_close(mixed[0], one[0])
        assert_close(mixed[1], one[1])
    # One-frame calls first, then a chunk: the chunk widens caches that already hold keys.
    one = stream(LMGen(lm, use_sampling=False), codes, [1])
    late = stream(LMGen(lm, use_sampling=False), codes, [1] * 9 + [12])
    assert_close(late[1], one[1])


def test_all_wrong_first_guess_still_ends_right() -> None:
    """Text guesses start at the padding token: make it a token the model never predicts, so that every
    first guess is wrong; the chunk still ends with the one-frame path's tokens."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=5)
    codes = random_codes(lm, 1, 16, seed=9)
    _, _, one_tokens = stream(LMGen(lm, use_sampling=False), codes, [1], "predicted")
    never = sorted(set(range(lm.text_card)) - set(one_tokens[:, 0].flatten().tolist()))[0]
    lm.existing_text_padding_id = never
    lm_gen = LMGen(lm, use_sampling=False)
    _, _, tokens = stream(lm_gen, codes, [16], "predicted")
    assert torch.equal(tokens, one_tokens)
    stats = lm_gen.chunk_stats
    assert stats.passes > 1 and stats.guesses_right < stats.guesses


def test_ttt_dual_form_streaming_equals_token_by_token() -> None:
    """`TTTLinear` given chunks that start and end inside mini-batches, items at different positions in
    their mini-batch (one was reset): the same outputs and state as one token per call."""
    torch.manual_seed(0)
    layer = TTTLinear(16, num_heads=2, mini_batch_size=4).eval()
    x = torch.randn(2, 23, 16)
    outs = {}
    states = {}
    for name, sizes in {"one": [1] * 23, "chunks": [3, 6, 1, 9, 4]}.items():
        with torch.no_grad(), layer.streaming(2):
            layer(x[:, :2])
            layer.reset_streaming(torch.tensor([True, False]))   # item 0 restarts, item 1 is at position 2
            start, ys = 0, []
            for size in sizes:
                ys.append(layer(x[:, start:start + size]))
                start += size
            outs[name] = torch.cat(ys, 1)
            s = layer._streaming_state
            states[name] = [t.clone() for t in (s.w, s.b, s.grad_w, s.grad_b, s.pos)]
    assert_close(outs["chunks"], outs["one"])
    for a, b in zip(states["chunks"], states["one"]):
        assert_close(a.float(), b.float())


class _OneFrameOnly(StreamingModule[State]):
    """A stateful layer that does not declare it handles several frames per call."""

    def _init_streaming_state(self, batch_size: int) -> State:
        return State(batch_size, torch.device("cpu"))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


def test_errors() -> None:
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=5)
    codes = random_codes(lm, 2, 8)
    user, forced = chunk_inputs(lm, codes, 3, 4, "forced")
    lm_gen = LMGen(lm, use_sampling=False)
    with lm_gen.streaming(2):
        not_forced = forced.clone()
        not_forced[1, 2, 1] = -2
        with pytest.raises(ValueError, match=r"every audio token forced.*codebook 1 of frame 1 \(batch item 1\)"):
            lm_gen.step_with_logits(user, not_forced)
        with pytest.raises(ValueError, match=r"forced_tokens must have shape \[2, 4, 4\]"):
            lm_gen.step_with_logits(user, forced[:, :, :3])
        bad_user = user.clone()
        bad_user[0, 1, 2] = lm.card
        with pytest.raises(ValueError, match=r"input_tokens\[0, 1, 2\] = 32 is out of range .*user audio"):
            lm_gen.step_with_logits(bad_user, forced)
    sampled = LMGen(lm, use_sampling=True)
    with sampled.streaming(2):
        free_text = forced.clone()
        free_text[:, 0] = -2
        with pytest.raises(ValueError, match="use_sampling=False"):
            sampled.step_with_logits(user, free_text)
        # Forced text needs no sampling: allowed.
        assert sampled.step_with_logits(user, forced) is not None
    lm.transformer.layers.append(_OneFrameOnly())
    for module in lm.modules():
        if isinstance(module, StreamingModule):
            module._cached_children = None
    lm_gen = LMGen(lm, use_sampling=False)
    with lm_gen.streaming(2):
        with pytest.raises(MultiFrameStreamingError, match=r"transformer.layers.2 \(_OneFrameOnly\).*--chunk 1"):
            lm_gen.step_with_logits(user, forced)
        assert lm_gen.step_with_logits(user[:, :, :1], forced[:, :, :1]) is None   # one frame still works


def test_single_frame_input_range_is_checked() -> None:
    """A user token out of range is refused before it reaches the model, and the stream still works."""
    lm = make_lm()
    lm_gen = LMGen(lm, use_sampling=False)
    codes = random_codes(lm, 1, 4)
    with lm_gen.streaming(1):
        for bad in (-2, lm.card):
            user = codes[:, 1 + lm.dep_q:, :1].clone()
            user[0, 0, 0] = bad
            with pytest.raises(ValueError, match=rf"input_tokens\[0, 0, 0\] = {bad} is out of range"):
                lm_gen.step_with_logits(user)
        for step in range(2):   # max_delay 1: the second step returns frame 0
            frame = codes[:, :, step:step + 1]
            out = lm_gen.step_with_logits(frame[:, 1 + lm.dep_q:], frame[:, :1 + lm.dep_q])
        assert out is not None and torch.isfinite(out.audio_logits).all()


def test_model_without_depformer_chunks() -> None:
    lm = make_lm(n_q=2, dep_q=0)
    codes = random_codes(lm, 2, 12)
    lm_gen = LMGen(lm, use_sampling=False)
    with lm_gen.streaming(2):
        chunked = lm_gen.step_with_logits(*chunk_inputs(lm, codes, 0, 12, "forced"))
    lm_gen = LMGen(lm, use_sampling=False)
    with lm_gen.streaming(2):
        single = [lm_gen.step_with_logits(*chunk_inputs(lm, codes, s, 1, "forced")) for s in range(12)]
    assert chunked.audio_logits is None and single[0] is None    # max_delay 1: step 0 returns no frame
    assert_close(chunked.text_logits, torch.cat([o.text_logits for o in single[1:]], 2))


def test_parallel_path_is_used_when_all_audio_is_forced(monkeypatch) -> None:
    """One frame per call: the parallel depformer runs exactly at the steps whose audio is all forced."""
    lm = make_lm()
    calls = {"parallel": 0, "sequential": 0}
    sequential, parallel = LMGen._depformer_step_with_logits, LMGen._parallel_depformer_logits

    def count(name, fn):
        def wrapper(self, *args):
            calls[name] += 1
            return fn(self, *args)
        return wrapper

    monkeypatch.setattr(LMGen, "_depformer_step_with_logits", count("sequential", sequential))
    monkeypatch.setattr(LMGen, "_parallel_depformer_logits", count("parallel", parallel))
    stream_teacher_forced(LMGen(lm, use_sampling=False), random_codes(lm, 2, 10))
    # Step 0 produces frame -1 of the delayed codebooks (nothing to force): every other step has all its
    # audio forced (the flush step forces "no input", -1).
    assert calls == {"sequential": 1, "parallel": 10}


@pytest.mark.parametrize("chunk", [1, 4])
def test_stream_started_under_inference_mode_is_usable_outside_it(chunk):
    """A stream whose first `step_with_logits` call ran under `torch.inference_mode()` holds inference tensors,
    which torch refuses to update outside inference mode: later calls outside it (`step_with_logits` and
    `step`) give the logits and tokens of a stream used under `no_grad` throughout (they used to raise torch's
    "Inplace update to inference tensor outside InferenceMode")."""
    lm = make_lm(context=32)
    codes = random_codes(lm, 2, 9)
    user = torch.full((2, lm.n_q - lm.dep_q, 9), -1, dtype=torch.long)

    def run(start_under_inference_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lm_gen = LMGen(lm, use_sampling=False)
        with lm_gen.streaming(2):
            with torch.inference_mode(start_under_inference_mode):
                first = lm_gen.step_with_logits(user[:, :, :1], codes[:, :1 + lm.dep_q, :1])
            assert first is None        # max_delay = 1: the first step returns no frame
            outs = [lm_gen.step_with_logits(user[:, :, s:s + chunk], codes[:, :1 + lm.dep_q, s:s + chunk])
                    for s in range(1, 9, chunk)]
            tokens = lm_gen.step(user[:, :, :1])
        return torch.cat([o.audio_logits for o in outs], dim=2), tokens

    (logits, tokens), (reference, reference_tokens) = run(True), run(False)
    assert torch.equal(logits, reference) and torch.equal(tokens, reference_tokens)
