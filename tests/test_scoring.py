"""moshi_eval.scoring.sequences against LMModel.forward on the same tokens (the independent oracle, DESIGN.md 4)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from moshi.utils.compile import no_compile

from helpers.lm_factory import make_lm
from moshi_eval.scoring.sequences import NonFiniteLossError, score, score_sequences
from moshi_patch import LMGen


def _tiny(max_delay: int = 1, context: int = 16):
    # Moshi-shaped: 16 streams, 8 of them the model's own audio; context shorter than the sequences so
    # the KV ring buffer wraps.
    return make_lm(n_q=16, dep_q=8, max_delay=max_delay, card=32, text_card=24, context=context,
                   depformer_multi_linear=True, depformer_weights_per_step=True)


def _codes(model, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.card, (model.dep_q, n), generator=gen) for n in lengths]


def _forward_ce(model, text: torch.Tensor, audio: torch.Tensor, user: torch.Tensor, w0: float):
    """Per-frame CE from LMModel.forward on full codes [1, K, T] (text [T], audio [dep_q, T], user [.., T]).

    Returns (codebook_ce [dep_q, T] float64 with NaN where forward has no valid logits, audio_ce, weighted).
    """
    codes = torch.cat([text[None], audio, user], dim=0)[None]
    with torch.no_grad(), no_compile():      # moshi's lazy torch.compile costs ~15 s on a CPU
        out = model(codes)
    logits = out.logits[0].double()                                  # [dep_q, T, card]
    T = audio.shape[1]
    ce = torch.full((model.dep_q, T), float("nan"), dtype=torch.float64)
    for k in range(model.dep_q):
        for t in range(T):
            if out.mask[0, k, t]:
                ce[k, t] = F.cross_entropy(logits[k, t][None], audio[k, t][None].clamp(min=0)).item()
    w = torch.ones(model.dep_q, dtype=torch.float64)
    w[0] = w0
    return ce, ce.mean(0), (ce * w[:, None]).sum(0) / w.sum()


@pytest.mark.parametrize("text_mode", ["pad", "zero"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("max_delay", [1, 2])
def test_forced_text_zero_user_equals_forward_oracle(max_delay, chunk, text_mode):
    """Text=pad or zero (-1, no text input), user=zero: streaming CE == CE of LMModel.forward logits on the
    same codes, at 1e-4, one frame per call or in chunks (64 > both lengths: one call for the whole batch)."""
    model = _tiny(max_delay)
    lengths = [23, 37]                                   # different lengths in one batch, > context
    codes = _codes(model, lengths)
    lm_gen = LMGen(model, use_sampling=False)
    scored = score_sequences(lm_gen, codes, user_stream="zero", text=text_mode, progress=False,
                             first_codebook_weight=100., chunk=chunk)
    got = {s.index: s for s in scored}
    assert sorted(got) == [0, 1]
    for i, c in enumerate(codes):
        T = c.shape[1]
        # The last frames' delayed codebooks are conditioned on the frames after the end: streaming forces
        # them to the zero token (-1), which is what forward sees with the codes padded by -1.
        audio = torch.cat([c, torch.full((model.dep_q, max_delay), -1)], dim=1)
        n = audio.shape[1]
        text_id = model.text_padding_token_id if text_mode == "pad" else model.zero_token_id
        text = torch.full((n,), text_id)
        user = torch.full((model.n_q - model.dep_q, n), -1)
        ce, plain, weighted = _forward_ce(model, text, audio, user, 100.)
        ce, plain, weighted = ce[:, :T], plain[:T], weighted[:T]
        assert torch.isfinite(ce).all()                   # every frame of the sequence is checked
        s = got[i]
        assert s.codebook_ce.shape == (8, T) and s.audio_ce.shape == (T,)
        np.testing.assert_allclose(s.codebook_ce, ce.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(s.audio_ce, plain.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(s.audio_ce_weighted, weighted.numpy(), atol=1e-4, rtol=0)
        assert (s.text_token == text_id).all()


def test_predicted_text_and_silence_user_replay_through_forward():
    """Text=predicted, user=silence: forward on (predicted text, codes, silence shifted as designed)."""
    model = _tiny()
    codes = _codes(model, [30], seed=3)
    gen = torch.Generator().manual_seed(4)
    silence = torch.randint(0, model.card, (8, 5), generator=gen)     # varying first frames, then constant
    lm_gen = LMGen(model, use_sampling=False)
    (s,) = list(score_sequences(lm_gen, codes, user_stream="silence", text="predicted", silence=silence,
                                progress=False))
    T = 30
    text = torch.from_numpy(s.text_token)
    assert (text >= 0).all() and (text < model.text_card).all()
    # User frame f is silence column min(f, 4): passed at step f + 1.
    user = silence[:, [min(f, 4) for f in range(T)]]
    ce, plain, _ = _forward_ce(model, text, codes[0], user, 100.)
    known = torch.isfinite(ce)                    # forward lacks the last frame of delayed codebooks
    assert known.sum() == 8 * T - 7
    np.testing.assert_allclose(s.codebook_ce[known.numpy()], ce[known].numpy(), atol=1e-4, rtol=0)
    # The predicted text is the model's argmax: forcing it as text gives the same stream, and it differs
    # from padding (else this test would not tell the modes apart).
    pad = list(score_sequences(LMGen(model, use_sampling=False), codes, user_stream="silence", text="pad",
                               silence=silence, progress=False))[0]
    assert not np.allclose(pad.audio_ce, s.audio_ce, atol=1e-3)


@pytest.mark.parametrize("text", ["predicted", "pad"])
@pytest.mark.parametrize("user_stream", ["silence", "zero"])
def test_chunked_scoring_equals_one_frame_scoring(text, user_stream):
    """Per-frame losses and text tokens do not depend on the chunk length (books of different lengths)."""
    model = _tiny(max_delay=2)
    codes = _codes(model, [19, 33, 26], seed=5)
    silence = torch.randint(0, model.card, (8, 4), generator=torch.Generator().manual_seed(2))
    kwargs = dict(user_stream=user_stream, text=text, progress=False,
                  silence=silence if user_stream == "silence" else None)
    runs = {}
    for chunk in (1, 7, 64):
        scored = score_sequences(LMGen(model, use_sampling=False), codes, chunk=chunk, **kwargs)
        runs[chunk] = {s.index: s for s in scored}
    for chunk in (7, 64):
        for i in range(3):
            a, b = runs[1][i], runs[chunk][i]
            np.testing.assert_array_equal(a.text_token, b.text_token)
            np.testing.assert_allclose(a.codebook_ce, b.codebook_ce, atol=1e-4, rtol=0)
            np.testing.assert_allclose(a.audio_ce_weighted, b.audio_ce_weighted, atol=1e-4, rtol=0)


def test_frames_beyond_length_are_never_counted():
    model = _tiny()
    codes = _codes(model, [12, 20])
    frames = list(score(LMGen(model, use_sampling=False), codes, user_stream="zero", text="pad",
                        progress=False))
    assert [f.frame for f in frames] == list(range(20))
    assert [int(f.valid.sum()) for f in frames] == [2] * 12 + [1] * 8
    for f in frames[12:]:
        assert torch.isnan(f.audio_ce[0]) and torch.isnan(f.codebook_ce[0]).all()
        assert f.text_token[0] == -1
        assert torch.isfinite(f.audio_ce[1])


@pytest.mark.parametrize("text", ["pad", "predicted"])
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("max_delay", [1, 2])
def test_max_frames_scores_the_kept_frames_as_the_full_run(max_delay, chunk, text):
    """`max_frames=N`: the per-frame losses are the first N of the full score, the last kept frame's delayed
    codebooks included (they are conditioned on the frames after N, which still feed the flush)."""
    model = _tiny(max_delay=max_delay)
    codes = _codes(model, [12, 20], seed=6)
    kwargs = dict(user_stream="zero", text=text, progress=False, chunk=chunk)
    full = {s.index: s for s in score_sequences(LMGen(model, use_sampling=False), codes, **kwargs)}
    for n in (10, 12):       # the first sequence is cut at 10, and kept whole at 12
        scored = score_sequences(LMGen(model, use_sampling=False), codes, max_frames=n, **kwargs)
        cut = {s.index: s for s in scored}
        for i in (0, 1):
            kept = min(n, codes[i].shape[1])
            assert cut[i].num_frames == kept
            np.testing.assert_allclose(cut[i].codebook_ce, full[i].codebook_ce[:, :kept], atol=1e-5, rtol=0)
            np.testing.assert_array_equal(cut[i].text_token, full[i].text_token[:kept])
    # The last kept frame's delayed codebooks do depend on the next frame: cutting the codes themselves
    # (what a run that drops the frames after N would score) changes them.
    alone = list(score_sequences(LMGen(model, use_sampling=False), [codes[1][:, :10]], **kwargs))[0]
    assert np.abs(alone.codebook_ce[1:, 9] - full[1].codebook_ce[1:, 9]).max() > 1e-3


def test_padded_tensor_with_lengths_equals_list():
    model = _tiny()
    codes = _codes(model, [9, 14])
    padded = torch.zeros(2, 8, 14, dtype=torch.long)
    padded[0, :, :9] = codes[0]
    padded[1] = codes[1]
    a = list(score_sequences(LMGen(model, use_sampling=False), codes, user_stream="zero", text="pad",
                             progress=False))
    b = list(score_sequences(LMGen(model, use_sampling=False), padded, lengths=[9, 14], user_stream="zero",
                             text="pad", progress=False))
    assert [s.index for s in a] == [0, 1] == [s.index for s in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.codebook_ce, y.codebook_ce)


@pytest.mark.parametrize("chunk", [1, 3])
def test_non_finite_logits_name_sequence_and_frame(chunk):
    model = _tiny()
    codes = _codes(model, [8, 8])
    lm_gen = LMGen(model, use_sampling=False)
    real = lm_gen.step_with_logits
    returned = [0]    # frames returned so far

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if out is not None:
            frames = out.audio_logits.shape[2]
            if returned[0] <= 5 < returned[0] + frames:
                out.audio_logits[1, 3, 5 - returned[0]] = float("inf")
            returned[0] += frames
        return out

    lm_gen.step_with_logits = poisoned
    with pytest.raises(NonFiniteLossError, match="book_b at frame 5") as info:
        list(score(lm_gen, codes, user_stream="zero", text="pad", progress=False,
                   sequence_ids=["book_a", "book_b"], chunk=chunk))
    assert info.value.sequence_id == "book_b" and info.value.frame == 5


def test_bad_arguments():
    model = _tiny()
    codes = _codes(model, [5])
    with pytest.raises(ValueError, match="use_sampling=False"):
        list(score(LMGen(model, use_sampling=True), codes, user_stream="zero", progress=False))
    lm_gen = LMGen(model, use_sampling=False)
    cases = [
        (dict(codes=codes, user_stream="silence"), "needs `silence`"),
        (dict(codes=codes, user_stream="loud"), "user_stream"),
        (dict(codes=codes, user_stream="zero", text="gold"), "text must be"),
        (dict(codes=codes, user_stream="silence", silence=torch.zeros(7, 3, dtype=torch.long)), "silence must"),
        (dict(codes=[torch.zeros(7, 5, dtype=torch.long)], user_stream="zero"), "8 codebooks"),
        (dict(codes=[torch.full((8, 5), 32)], user_stream="zero"), "card=32"),
        (dict(codes=[torch.zeros(8, 0, dtype=torch.long)], user_stream="zero"), "no frame"),
        (dict(codes=codes, user_stream="zero", max_frames=0), "max_frames"),
        (dict(codes=torch.zeros(8, 5, dtype=torch.long), user_stream="zero"), "got a tensor of shape"),
        (dict(codes=codes, user_stream="zero", silence=torch.zeros(8, 3, dtype=torch.long)),
         "silence was given but user_stream='zero'"),
        (dict(codes=codes, user_stream="zero", first_codebook_weight=0.), "first_codebook_weight"),
        (dict(codes=codes, user_stream="zero", chunk=0), "chunk must be a positive integer"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            list(score(lm_gen, progress=False, **kwargs))
    # Errors leave the LMGen usable (its streaming state is closed).
    assert lm_gen._streaming_state is None
    assert math.isfinite(next(score(lm_gen, codes, user_stream="zero", progress=False)).audio_ce[0])
