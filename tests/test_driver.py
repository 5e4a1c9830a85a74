"""`moshi_patch.teacher_force` against `LMModel.forward` on the codes each item of a batch stands for."""
import pytest
import torch

from moshi_patch import LMGen, TeacherForcing, teacher_force

from helpers.lm_factory import assert_close, make_lm, random_codes


def _model(max_delay: int = 2):
    return make_lm(n_q=6, dep_q=3, max_delay=max_delay, context=5)


def _forward_codes(lm, audio: torch.Tensor, text: torch.Tensor, user: torch.Tensor, frames: int) -> torch.Tensor:
    """Codes `[1, K, frames]` for `LMModel.forward`: audio `[dep_q, T]` and text `[T']` padded with -1 (no
    input), user `[Ku, n]` with its last column repeated: what teacher forcing streams."""
    codes = torch.full((1, lm.num_codebooks, frames), -1, dtype=torch.long)
    codes[0, 1:1 + lm.dep_q, :audio.shape[1]] = audio[:, :frames]
    codes[0, 0, :text.shape[0]] = text[:frames]
    columns = torch.arange(frames).clamp(max=user.shape[1] - 1)
    codes[0, 1 + lm.dep_q:] = user[:, columns]
    return codes


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("user_mode", ["zero", "shared", "per_item"])
@pytest.mark.parametrize("text_mode", ["pad", "zero", "tokens"])
def test_items_of_different_lengths_equal_forward(text_mode: str, user_mode: str, chunk: int) -> None:
    """A list of items of 9 and 14 frames: each item's logits at its frames equal `LMModel.forward` on its own
    codes, padded with -1 after its end (what the flush and a shorter item are forced to)."""
    lm = _model()
    D = max(lm.delays)
    lengths = [9, 14]
    full = random_codes(lm, 2, 14, seed=2)
    audio = [full[i, 1:1 + lm.dep_q, :n] for i, n in enumerate(lengths)]
    Ku = lm.n_q - lm.dep_q
    text_arg = {"pad": "pad", "zero": "zero", "tokens": full[:, 0]}[text_mode]
    silence = torch.randint(0, lm.card, (Ku, 3), generator=torch.Generator().manual_seed(5))
    user_arg = {"zero": "zero", "shared": silence, "per_item": full[:, 1 + lm.dep_q:]}[user_mode]
    chunks = list(teacher_force(LMGen(lm, use_sampling=False), audio, text=text_arg, user=user_arg, chunk=chunk))
    assert [c.start for c in chunks] == sorted(c.start for c in chunks) and chunks[-1].stop == 14
    text = torch.cat([c.logits.text_logits for c in chunks], 2)
    streamed = torch.cat([c.logits.audio_logits for c in chunks], 2)
    valid = torch.cat([c.valid for c in chunks], 1)
    assert valid.tolist() == [[t < n for t in range(14)] for n in lengths]
    for i, n in enumerate(lengths):
        # A text mode holds during the flush too; forced text tokens are forced wherever they are given.
        text_tokens = {"pad": torch.full((n + D,), lm.text_padding_token_id), "zero": torch.full((n + D,), -1),
                       "tokens": full[i, 0]}[text_mode]
        user = {"zero": torch.full((Ku, 1), -1), "shared": user_arg,
                "per_item": full[i, 1 + lm.dep_q:]}[user_mode]
        codes = _forward_codes(lm, audio[i], text_tokens, user, n + D)
        with torch.no_grad():
            reference = lm(codes)
        mask = reference.mask[0, :, :n]
        assert mask.all()         # with the frames after the end, every frame of the item is checked
        assert_close(streamed[i, :, :n], reference.logits[0, :, :n])
        assert_close(text[i, 0, :n], reference.text_logits[0, 0, :n])


@pytest.mark.parametrize("chunk", [1, 3])
def test_max_frames_feeds_the_next_frames_to_the_flush(chunk: int) -> None:
    """`max_frames=N` returns frames 0 .. N - 1 with the logits of the whole sequence, the delayed codebooks
    of frame N - 1 included; cutting the codes instead changes them."""
    lm = _model()
    codes = random_codes(lm, 2, 12, seed=3)
    kwargs = dict(text=codes[:, 0], user=codes[:, 1 + lm.dep_q:], chunk=chunk)
    audio = codes[:, 1:1 + lm.dep_q]

    def logits(**extra) -> torch.Tensor:
        chunks = teacher_force(LMGen(lm, use_sampling=False), **extra, **kwargs)
        return torch.cat([c.logits.audio_logits for c in chunks], 2)

    whole = logits(audio=audio)
    cut = logits(audio=audio, max_frames=8)
    assert cut.shape[2] == 8
    assert_close(cut, whole[:, :, :8])
    alone = logits(audio=audio[:, :, :8])
    assert (alone[:, 1:, 7] - whole[:, 1:, 7]).abs().max() > 1e-3     # frame 7's delayed codebooks


def test_predicted_text_is_the_greedy_text_and_open_stream_is_continued() -> None:
    """Text left to the model: its tokens are the argmax of the returned text logits. An LMGen already
    streaming (just reset) is driven in its stream, which stays open."""
    lm = _model(max_delay=1)
    codes = random_codes(lm, 2, 10, seed=4)
    lm_gen = LMGen(lm, use_sampling=False)
    with lm_gen.streaming(2):
        for _ in range(3):
            lm_gen.step_with_logits(codes[:, 1 + lm.dep_q:, :1])
        lm_gen.reset_streaming()
        chunks = list(teacher_force(lm_gen, codes[:, 1:1 + lm.dep_q], text="predicted", chunk=4))
        assert lm_gen._streaming_state is not None
    fresh = list(teacher_force(LMGen(lm, use_sampling=False), codes[:, 1:1 + lm.dep_q], text="predicted"))
    tokens = torch.cat([c.logits.tokens for c in chunks], 2)
    text = torch.cat([c.logits.text_logits for c in chunks], 2)
    assert torch.equal(tokens[:, 0], text[:, 0].argmax(-1))
    assert torch.equal(tokens, torch.cat([c.logits.tokens for c in fresh], 2))
    assert torch.equal(tokens[:, 1:], codes[:, 1:1 + lm.dep_q])


def test_inputs_follow_the_rule() -> None:
    """Step s: frame s forced, user frame s - 1; after the codes, -1."""
    lm = _model(max_delay=2)
    codes = random_codes(lm, 1, 5, seed=6)
    plan = TeacherForcing(lm, codes[:, 1:1 + lm.dep_q], text="pad", user=codes[:, 1 + lm.dep_q:])
    assert plan.num_steps == 7 and plan.lengths == [5]
    user, forced = plan.inputs(0, 7)
    assert torch.equal(forced[:, 1:, :5], codes[:, 1:1 + lm.dep_q]) and (forced[:, 1:, 5:] == -1).all()
    assert (forced[:, 0] == lm.text_padding_token_id).all()
    assert torch.equal(user[:, :, 1:6], codes[:, 1 + lm.dep_q:]) and torch.equal(user[:, :, 6], user[:, :, 5])


def test_errors_name_the_argument() -> None:
    lm = _model()
    codes = random_codes(lm, 2, 6)
    audio = codes[:, 1:1 + lm.dep_q]
    lm_gen = LMGen(lm, use_sampling=False)
    cases = [
        (dict(text="gold"), ValueError, "text must be one of"),
        (dict(text=torch.zeros(3, 6, dtype=torch.long)), ValueError, r"text tokens must have shape \[B=2, T\]"),
        (dict(text=torch.full((2, 6), lm.text_card)), ValueError, "text_card=24"),
        (dict(user="silence"), ValueError, "user must be 'zero' or a tensor"),
        (dict(user=torch.zeros(2, 2, 4, dtype=torch.long)), ValueError, r"user tokens must have shape \[3\]"),
        (dict(user=torch.zeros(3, 4)), TypeError, "user must hold integer tokens"),
        (dict(max_frames=0), ValueError, "max_frames must be a positive integer"),
        (dict(chunk=0), ValueError, "chunk must be a positive integer"),
        (dict(lengths=[7, 6]), ValueError, r"lengths\[0\] = 7 must be in \[1, 6\]"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            list(teacher_force(lm_gen, audio, **kwargs))
    with pytest.raises(ValueError, match="8 codebooks|3 codebooks"):
        list(teacher_force(lm_gen, codes[:, :2]))
    with pytest.raises(ValueError, match="use_sampling=False"):
        list(teacher_force(LMGen(lm, use_sampling=True), audio))
    with lm_gen.streaming(2):
        lm_gen.step_with_logits(codes[:, 1 + lm.dep_q:, :1])
        with pytest.raises(ValueError, match=r"streaming at step 1.*reset_streaming"):
            list(teacher_force(lm_gen, audio, text="pad"))
    with lm_gen.streaming(1):
        with pytest.raises(ValueError, match="batch size 1, but audio holds 2"):
            list(teacher_force(lm_gen, audio, text="pad"))
    assert lm_gen._streaming_state is None
