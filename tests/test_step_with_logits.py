"""`LMGen.step_with_logits` against independent computations: `LMModel.forward`, replays, upstream `step()`."""
import contextlib
import os

import pytest
import torch
from moshi.models import lm as upstream_lm
from moshi.models.lm_utils import _delay_sequence

from helpers.lm_factory import make_lm, random_codes

# `MOSHI_PATCH_TEST_LMGEN=upstream`: test `moshi.models.lm.LMGen` of a moshi with the upstream patch applied
# (tests/test_upstream.py, `python -m moshi_patch.upstream --run-tests`) instead of moshi_patch's subclass.
LMGEN_UNDER_TEST = os.environ.get("MOSHI_PATCH_TEST_LMGEN", "moshi_patch")
if LMGEN_UNDER_TEST == "upstream":
    from moshi.models.lm import LMGen, StepLogits
elif LMGEN_UNDER_TEST == "moshi_patch":
    from moshi_patch import LMGen, StepLogits
else:
    raise ValueError(f"MOSHI_PATCH_TEST_LMGEN must be `moshi_patch` (default) or `upstream`, "
                     f"got {LMGEN_UNDER_TEST!r}.")

ATOL = 1e-4


# The one independent teacher-forcing loop of the tests, written out by hand so that `step_with_logits` is
# checked against `LMModel.forward` without `moshi_patch.teacher_force` (which the other tests use, and
# which must not be imported here: these tests also run on an upstream-patched moshi alone).
def user_frame(codes: torch.Tensor, dep_q: int, step: int) -> torch.Tensor:
    """User tokens `[B, n_q - dep_q, 1]` to pass at `step` so that streaming reproduces `LMModel.forward`.

    The user stream passed at step `s` takes the place of frame `s - 1` (what step 0 gets is ignored);
    past the last frame, the last one is repeated (it only affects frames that are not compared).
    """
    T = codes.shape[-1]
    frame = min(max(step - 1, 0), T - 1)
    return codes[:, dep_q + 1:, frame:frame + 1]


def stream_by_hand(lm_gen, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Streams `codes [B, K, T]` through `lm_gen.step_with_logits` one frame per call, teacher forcing the
    model's streams.

    Returns the text logits `[B, 1, T, text_card_out]`, audio logits `[B, dep_q, T, card]` (or None) and
    tokens `[B, 1 + dep_q, T]` of frames 0..T-1, stacked from the per-step outputs. Streams in `lm_gen`'s
    open stream if it has one (at its first step), else in a new one.
    """
    B, K, T = codes.shape
    dep_q = lm_gen.lm_model.dep_q
    text, audio, tokens = [], [], []
    with contextlib.nullcontext() if lm_gen._streaming_state is not None else lm_gen.streaming(B):
        for step in range(T + lm_gen.max_delay):
            if step < T:
                forced = codes[:, :1 + dep_q, step:step + 1]
            else:  # Flushing the delays: frames past the end are the model's choice, and not compared.
                forced = torch.full_like(codes[:, :1 + dep_q, :1], -2)
            out = lm_gen.step_with_logits(user_frame(codes, dep_q, step), forced)
            if out is None:
                continue
            text.append(out.text_logits)
            tokens.append(out.tokens)
            if out.audio_logits is not None:
                audio.append(out.audio_logits)
    return torch.cat(text, 2), (torch.cat(audio, 2) if audio else None), torch.cat(tokens, 2)


def assert_close_where_valid(streamed: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> None:
    """Streamed and reference logits `[B, K, T, card]` agree at every valid position of `mask [B, K, T]`."""
    assert streamed.shape == reference.shape
    assert mask.any()
    diff = (streamed.float() - reference.float())[mask]
    assert torch.isfinite(diff).all()
    assert diff.abs().max().item() < ATOL, diff.abs().max().item()


MODELS = {
    # KV context longer than the 12 frames streamed.
    "context_long": dict(context=32),
    # Ring buffer wrap: the KV cache holds fewer frames than the sequence.
    "context_short": dict(context=4),
    "max_delay_2": dict(n_q=6, dep_q=3, max_delay=2, context=5),
    "multi_linear": dict(n_q=6, dep_q=3, max_delay=2, depformer_multi_linear=True),
    "multi_linear_schedule": dict(n_q=6, dep_q=3, depformer_multi_linear=True,
                                  depformer_weights_per_step_schedule=[0, 1, 1]),
}


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("batch", [2])
@pytest.mark.parametrize("model", list(MODELS))
def test_teacher_forced_equals_forward(model: str, batch: int, parallel: bool) -> None:
    lm = make_lm(**MODELS[model])
    codes = random_codes(lm, batch, 12)
    reference = lm(codes)
    lm_gen = LMGen(lm, use_sampling=False)
    lm_gen.parallel_forced_depformer = parallel
    text, audio, tokens = stream_by_hand(lm_gen, codes)
    assert_close_where_valid(text, reference.text_logits, reference.text_mask)
    assert_close_where_valid(audio, reference.logits, reference.mask)
    # Forced tokens are returned as given.
    assert torch.equal(tokens, codes[:, :1 + lm.dep_q])


def test_model_without_depformer_matches_forward_text() -> None:
    lm = make_lm(n_q=2, dep_q=0)
    codes = random_codes(lm, 2, 12)
    B = codes.shape[0]
    initial = lm._get_initial_token().expand(B, -1, -1)
    delayed = torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)
    with torch.no_grad():
        _, reference = lm.forward_text(delayed[:, :, :-1])
    text, audio, _ = stream_by_hand(LMGen(lm, use_sampling=False), codes)
    assert audio is None
    assert_close_where_valid(text, reference, torch.ones(reference.shape[:3], dtype=torch.bool))


def free_run(lm_gen, user: torch.Tensor, forced: torch.Tensor | None = None) -> list[StepLogits]:
    """Steps with `user [B, Ku, S]` passed as is at each step `s`; optional `forced [B, 1 + dep_q, S]`."""
    outs = []
    with lm_gen.streaming(user.shape[0]):
        for step in range(user.shape[-1]):
            f = None if forced is None else forced[:, :, step:step + 1]
            out = lm_gen.step_with_logits(user[:, :, step:step + 1], f)
            if out is not None:
                outs.append(out)
    return outs


def replay_forward(lm, outs: list[StepLogits], user: torch.Tensor):
    """`LMModel.forward` on the returned tokens and the user stream, shifted as streaming sees it."""
    tokens = torch.cat([o.tokens for o in outs], dim=2)
    T = tokens.shape[-1]
    # The user tokens passed at step s are frame s - 1 of the user stream.
    codes = torch.cat([tokens, user[:, :, 1:T + 1]], dim=1)
    with torch.no_grad():
        return lm(codes)


@pytest.mark.parametrize("use_sampling", [False, True], ids=["greedy", "sampled"])
def test_replay_reproduces_returned_logits(use_sampling: bool) -> None:
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=6)
    user = random_codes(lm, 2, 16, seed=3)[:, 1 + lm.dep_q:]
    torch.manual_seed(7)
    outs = free_run(LMGen(lm, use_sampling=use_sampling, temp=1.0, temp_text=1.0), user)
    reference = replay_forward(lm, outs, user)
    text = torch.cat([o.text_logits for o in outs], 2)
    audio = torch.cat([o.audio_logits for o in outs], 2)
    assert_close_where_valid(text, reference.text_logits, reference.text_mask)
    assert_close_where_valid(audio, reference.logits, reference.mask)
    if not use_sampling:
        tokens = torch.cat([o.tokens for o in outs], dim=2)
        assert torch.equal(tokens[:, :1], text.argmax(-1))
        assert torch.equal(tokens[:, 1:], audio.argmax(-1))


def test_partial_forcing_replays() -> None:
    """Text forced, audio codebook 1 forced, the rest the model's choice: the replay still holds."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2)
    codes = random_codes(lm, 2, 14, seed=5)
    user = codes[:, 1 + lm.dep_q:]
    forced = torch.full_like(codes[:, :1 + lm.dep_q], -2)
    forced[:, 0] = codes[:, 0]
    forced[:, 2] = codes[:, 2]
    outs = free_run(LMGen(lm, use_sampling=False), user, forced)
    tokens = torch.cat([o.tokens for o in outs], dim=2)
    T = tokens.shape[-1]
    assert torch.equal(tokens[:, 0], codes[:, 0, :T])
    assert torch.equal(tokens[:, 2], codes[:, 2, :T])
    reference = replay_forward(lm, outs, user)
    assert_close_where_valid(torch.cat([o.audio_logits for o in outs], 2), reference.logits, reference.mask)
    assert_close_where_valid(torch.cat([o.text_logits for o in outs], 2), reference.text_logits,
                             reference.text_mask)


def upstream_tokens(lm, user: torch.Tensor, use_sampling: bool, seed: int, cls=upstream_lm.LMGen) -> torch.Tensor:
    lm_gen = cls(lm, use_sampling=use_sampling)
    torch.manual_seed(seed)
    outs = []
    with lm_gen.streaming(user.shape[0]):
        for step in range(user.shape[-1]):
            out = lm_gen.step(user[:, :, step:step + 1])
            if out is not None:
                outs.append(out)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("use_sampling", [False, True], ids=["greedy", "sampled"])
def test_tokens_equal_upstream_step(use_sampling: bool) -> None:
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=8)
    user = random_codes(lm, 2, 20, seed=11)[:, 1 + lm.dep_q:]
    expected = upstream_tokens(lm, user, use_sampling, seed=3)
    torch.manual_seed(3)
    outs = free_run(LMGen(lm, use_sampling=use_sampling), user)
    assert torch.equal(torch.cat([o.tokens for o in outs], dim=2), expected)
    # `step()` of the subclass is upstream's.
    assert torch.equal(upstream_tokens(lm, user, use_sampling, seed=3, cls=LMGen), expected)
    if use_sampling:  # The comparison is not vacuous: another seed samples other tokens.
        assert not torch.equal(upstream_tokens(lm, user, use_sampling, seed=4), expected)


@pytest.mark.skipif(LMGEN_UNDER_TEST == "upstream", reason="the pull request refuses a frame computed by step() "
                    "(test_step_first_then_step_with_logits_is_refused); moshi_patch.LMGen's step() keeps logits")
def test_step_unchanged_after_step_with_logits() -> None:
    """Mixing both methods in one stream: `step()` continues the stream as upstream's would."""
    lm = make_lm()
    user = random_codes(lm, 1, 10, seed=2)[:, 1 + lm.dep_q:]
    expected = upstream_tokens(lm, user, use_sampling=False, seed=0)
    lm_gen = LMGen(lm, use_sampling=False)
    outs = []
    with lm_gen.streaming(1):
        for step in range(user.shape[-1]):
            frame = user[:, :, step:step + 1]
            # step_with_logits first: the logits of a frame computed by step() before it cannot be returned.
            out = lm_gen.step(frame) if step % 2 else lm_gen.step_with_logits(frame)
            if out is not None:
                outs.append(out.tokens if isinstance(out, StepLogits) else out)
    assert torch.equal(torch.cat(outs, dim=2), expected)


def test_exec_mask_masked_steps_never_happened() -> None:
    """Item 1 is masked during steps 3..5: its logits equal those of a stream without those steps."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=6)
    codes = random_codes(lm, 2, 10, seed=4)
    dep_q = lm.dep_q
    masked_steps = {3, 4, 5}
    lm_gen = LMGen(lm, use_sampling=False)
    per_item = {0: [], 1: []}
    frame_of = [0, 0]  # Next frame each item consumes.
    with lm_gen.streaming(2):
        for step in range(10 + len(masked_steps) + lm_gen.max_delay):
            mask = torch.tensor([True, step not in masked_steps])
            lm_gen.set_exec_mask(mask)
            forced, user = [], []
            for b in range(2):
                f = frame_of[b]
                forced.append(codes[b, :1 + dep_q, f:f + 1] if f < 10 else torch.full((1 + dep_q, 1), -2))
                user.append(user_frame(codes[b:b + 1], dep_q, f)[0])
            out = lm_gen.step_with_logits(torch.stack(user), torch.stack(forced))
            if out is not None:
                for b in range(2):
                    if mask[b]:
                        per_item[b].append(out.audio_logits[b])
                    else:  # A masked item returns no frame: ungenerated tokens and NaN logits.
                        assert (out.tokens[b] == -2).all() and out.audio_logits[b].isnan().all()
            for b in range(2):
                frame_of[b] += int(mask[b])
    for b in range(2):
        alone_text, alone_audio, _ = stream_by_hand(LMGen(lm, use_sampling=False), codes[b:b + 1])
        streamed = torch.stack(per_item[b], dim=0)  # [frames returned, dep_q, 1, card]
        valid = ~streamed.isnan().all(-1).all(-1).all(-1)
        got = streamed[valid][:10, :, 0]  # Frames 0..9, [T, dep_q, card]
        assert got.shape[0] == 10
        expected = alone_audio[0].transpose(0, 1)  # [T, dep_q, card]
        assert torch.isfinite(got).all() and torch.isfinite(expected).all()
        assert (got - expected).abs().max() < ATOL


def test_reset_streaming_restarts_the_stream() -> None:
    lm = make_lm(n_q=6, dep_q=3, max_delay=2)
    codes = random_codes(lm, 2, 8, seed=9)
    lm_gen = LMGen(lm, use_sampling=False)
    first = stream_by_hand(lm_gen, codes)
    other = random_codes(lm, 2, 8, seed=10)
    with lm_gen.streaming(2):
        for step in range(5):  # Something else first, then a reset.
            lm_gen.step_with_logits(user_frame(other, lm.dep_q, step), other[:, :1 + lm.dep_q, step:step + 1])
        lm_gen.reset_streaming()
        text, audio, _ = stream_by_hand(lm_gen, codes)     # in the open stream
    assert torch.allclose(text, first[0], atol=ATOL, equal_nan=True)
    assert torch.allclose(audio, first[1], atol=ATOL, equal_nan=True)


def test_cfg_logits_are_the_cfg_mix() -> None:
    """With `cfg_is_no_text`, the unconditioned half sees no text: compare with the mix computed by hand."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2)
    codes = random_codes(lm, 2, 10, seed=6)
    cfg_coef = 2.5
    lm_gen = LMGen(lm, use_sampling=False, cfg_coef=cfg_coef, cfg_is_no_text=True)
    text, audio, _ = stream_by_hand(lm_gen, codes)
    with torch.no_grad():
        conditioned = lm(codes)
        # Unconditioned: the temporal transformer sees the zero token instead of the text (after the
        # initial step), while the depformer still gets the text token.
        B = codes.shape[0]
        initial = lm._get_initial_token().expand(B, -1, -1)
        delayed = torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)
        no_text = delayed.clone()
        no_text[:, 0, 1:] = lm.zero_token_id
        transformer_out, _ = lm.forward_text(no_text[:, :, :-1])
        null = lm.forward_depformer_training(delayed[:, :, 1:], transformer_out)
        null = torch.stack([null[:, k].roll(-lm.delays[1 + k], dims=1) for k in range(lm.dep_q)], dim=1)
    expected = null + (conditioned.logits - null) * cfg_coef
    assert_close_where_valid(text, conditioned.text_logits, conditioned.text_mask)
    assert_close_where_valid(audio, expected, conditioned.mask)
    # The mix is not the conditioned logits alone.
    assert (audio - conditioned.logits)[conditioned.mask].abs().max() > 10 * ATOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphed_logits_are_copies() -> None:
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, device="cuda")
    codes = random_codes(lm, 2, 12)
    reference = lm(codes)
    for parallel in (True, False):
        lm_gen = LMGen(lm, use_sampling=False)
        lm_gen.parallel_forced_depformer = parallel
        text, audio, _ = stream_by_hand(lm_gen, codes)
        assert_close_where_valid(text, reference.text_logits, reference.text_mask)
        assert_close_where_valid(audio, reference.logits, reference.mask)
        # Consecutive frames kept from the graphed buffers must differ.
        assert (audio[:, :, 2] - audio[:, :, 3]).abs().max() > 1e-3


# Errors: each names the argument, what was expected and what came.

def test_error_outside_streaming() -> None:
    lm = make_lm()
    with pytest.raises(RuntimeError, match="inside `with lm_gen.streaming"):
        LMGen(lm).step_with_logits(torch.zeros(1, 2, 1, dtype=torch.long))


@pytest.mark.parametrize("name", ["input_tokens", "forced_tokens"])
@pytest.mark.parametrize("bad,exc,message", [
    (lambda shape: torch.zeros(shape[:2], dtype=torch.long), ValueError, r"must have rank 3.*got rank 2"),
    (lambda shape: torch.zeros((3,) + shape[1:], dtype=torch.long), ValueError, r"batch size 3.*streaming\(2\)"),
    (lambda shape: torch.zeros((2, shape[1] + 1, 1), dtype=torch.long), ValueError, r"must have shape \[2, \d, 1\]"),
    # No frame (moshi_patch.LMGen takes several frames per call: tests/test_chunked.py).
    (lambda shape: torch.zeros((2, shape[1], 0), dtype=torch.long), ValueError, r"must have shape \[2, \d, 1\]"),
    (lambda shape: torch.zeros(shape), TypeError, r"integer token ids.*torch.float32"),
    (lambda shape: [[[0]]], TypeError, r"must be a torch.Tensor.*got list"),
])
def test_error_bad_tokens(name, bad, exc, message) -> None:
    lm = make_lm()
    lm_gen = LMGen(lm)
    good = {"input_tokens": torch.zeros(2, lm.n_q - lm.dep_q, 1, dtype=torch.long),
            "forced_tokens": torch.zeros(2, 1 + lm.dep_q, 1, dtype=torch.long)}
    good[name] = bad(tuple(good[name].shape))
    with lm_gen.streaming(2):
        with pytest.raises(exc, match=f"{name} .*{message}|{name} {message}"):
            lm_gen.step_with_logits(**good)


@pytest.mark.parametrize("stream,value,message", [
    (0, 24, r"forced_tokens\[1, 0, 0\] = 24 .*stream 0 \(text\).*\[0, 24\)"),
    (2, 32, r"forced_tokens\[1, 2, 0\] = 32 .*stream 2 \(audio codebook 1\).*\[0, 32\)"),
    (1, -3, r"forced_tokens\[1, 1, 0\] = -3 .*-2 \(model's choice\), -1 \(no input\)"),
])
def test_error_forced_out_of_range(stream: int, value: int, message: str) -> None:
    lm = make_lm()  # text_card 24, card 32
    lm_gen = LMGen(lm)
    forced = torch.zeros(2, 1 + lm.dep_q, 1, dtype=torch.long)
    forced[1, stream] = value
    with lm_gen.streaming(2):
        with pytest.raises(ValueError, match=message):
            lm_gen.step_with_logits(torch.zeros(2, 2, 1, dtype=torch.long), forced)
        # Nothing was consumed by the failed call: the stream still starts at step 0.
        assert lm_gen.step_with_logits(torch.zeros(2, 2, 1, dtype=torch.long)) is None


def test_error_training_mode() -> None:
    lm = make_lm()
    lm_gen = LMGen(lm)
    lm.train()
    with lm_gen.streaming(1):
        with pytest.raises(RuntimeError, match=r"training mode.*lm_model.eval\(\)"):
            lm_gen.step_with_logits(torch.zeros(1, 2, 1, dtype=torch.long))


# Item by item of the code that runs: no source rewriting, step() untouched, the logits the token came from.

def _stream_tokens(lm_gen, user: torch.Tensor, method: str, schedule=None) -> torch.Tensor:
    """Tokens of a stream of `method` calls (`step` or `step_with_logits`) on `user [B, Ku, S]`; `schedule`
    maps a step to `("mask", exec_mask)` (set before the step) or `("reset", None)` (reset before it)."""
    outs = []
    with lm_gen.streaming(user.shape[0]):
        for step in range(user.shape[-1]):
            action, value = (schedule or {}).get(step, (None, None))
            if action == "mask":
                lm_gen.set_exec_mask(value)
            elif action == "reset":
                lm_gen.reset_streaming()
            out = getattr(lm_gen, method)(user[:, :, step:step + 1])
            if out is not None:
                outs.append(out.tokens if isinstance(out, StepLogits) else out)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("setting", ["cfg", "exec_mask", "reset"])
@pytest.mark.parametrize("use_sampling", [False, True], ids=["greedy", "sampled"])
def test_tokens_equal_upstream_step_cfg_mask_reset(setting: str, use_sampling: bool) -> None:
    """Nothing forced, step_with_logits returns the tokens of upstream's `step()`, sampling under the same
    seed, with CFG, with items masked by `set_exec_mask`, and across `reset_streaming`."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=8)
    user = random_codes(lm, 2, 16, seed=12)[:, 1 + lm.dep_q:]
    kwargs: dict = dict(use_sampling=use_sampling)
    schedule = None
    if setting == "cfg":
        kwargs.update(cfg_coef=2.0, cfg_is_no_text=True)
    elif setting == "exec_mask":
        schedule = {4: ("mask", torch.tensor([True, False])), 7: ("mask", torch.tensor([True, True]))}
    else:
        schedule = {9: ("reset", None)}
    torch.manual_seed(5)
    expected = _stream_tokens(upstream_lm.LMGen(lm, **kwargs), user, "step", schedule)
    torch.manual_seed(5)
    got = _stream_tokens(LMGen(lm, **kwargs), user, "step_with_logits", schedule)
    assert torch.equal(got, expected)
    if use_sampling:   # Not vacuous: another seed samples other tokens.
        torch.manual_seed(6)
        assert not torch.equal(_stream_tokens(upstream_lm.LMGen(lm, **kwargs), user, "step", schedule), expected)


_IMPORT_WITHOUT_SOURCE = """
import sys, torch
import moshi, moshi.models.lm
assert moshi.__file__.endswith(".pyc") and moshi.__file__.startswith(sys.argv[1]), moshi.__file__
import moshi_patch
from helpers.lm_factory import make_lm, random_codes
lm = make_lm()
codes = random_codes(lm, 1, 4)
lm_gen = moshi_patch.LMGen(lm, use_sampling=False)
with lm_gen.streaming(1):
    for step in range(3):
        out = lm_gen.step_with_logits(codes[:, 1 + lm.dep_q:, :1], codes[:, :1 + lm.dep_q, step:step + 1])
assert torch.equal(out.tokens[:, :, 0], codes[:, :1 + lm.dep_q, 1])
print("OK")
"""


def test_import_with_a_moshi_installed_without_source(tmp_path) -> None:
    """`import moshi_patch` reads no source of moshi: it works with a moshi of `.pyc` files only."""
    import compileall
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    import moshi
    copy = tmp_path / "site"
    shutil.copytree(Path(moshi.__file__).parent, copy / "moshi", ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(copy / "moshi", legacy=True, quiet=1)
    for source in (copy / "moshi").rglob("*.py"):
        source.unlink()
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", ""), str(tests)]),
               NO_TORCH_COMPILE="1", MOSHI_PATCH_SKIP_VERSION_CHECK="1")
    result = subprocess.run([sys.executable, "-c", _IMPORT_WITHOUT_SOURCE, str(copy)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


class _OpCounter(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(LMGEN_UNDER_TEST == "upstream", reason="tests moshi_patch.LMGen.step against upstream's")
def test_step_runs_upstream_code_until_step_with_logits() -> None:
    """A stream that only calls `step()`: the same torch calls as upstream's `step()`, the caller's hooks
    untouched, upstream's depformer graph, and no step_with_logits state."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2)
    user = random_codes(lm, 2, 8, seed=3)[:, 1 + lm.dep_q:]

    def on_text_logits(logits):
        pass

    def run(cls):
        lm_gen = cls(lm, use_sampling=False, on_text_logits_hook=on_text_logits)
        counter = _OpCounter()
        with lm_gen.streaming(2):
            state = lm_gen._streaming_state
            with counter:
                for step in range(user.shape[-1]):
                    lm_gen.step(user[:, :, step:step + 1])
            assert lm_gen.on_text_logits_hook is on_text_logits and lm_gen.on_text_hook is None
            assert state.graphed_depth.func == lm_gen.depformer_step
            assert getattr(state, "step_logits", None) is None
        return counter.calls

    upstream_calls = run(upstream_lm.LMGen)
    assert len(upstream_calls) > 50
    assert run(LMGen) == upstream_calls


def test_callers_hooks_set_at_any_time_keep_working_and_are_never_reverted() -> None:
    """The caller's text hooks, set before or during a stream, see what step_with_logits forced, also when
    changed between steps; nothing puts back an older hook, during or after the stream."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=5)
    codes = random_codes(lm, 2, 6)
    seen_first, seen_second, seen_logits = [], [], []
    lm_gen = LMGen(lm, use_sampling=False, on_text_hook=lambda t: seen_first.append(t.clone()))
    with lm_gen.streaming(2):
        for step in range(3):
            lm_gen.step_with_logits(user_frame(codes, lm.dep_q, step), codes[:, :1 + lm.dep_q, step:step + 1])
        assert torch.equal(seen_first[2], codes[:, 0, 2])       # the forced text token

        def second(token: torch.Tensor) -> None:
            seen_second.append(token.clone())

        lm_gen.on_text_hook = second
        lm_gen.on_text_logits_hook = lambda logits: seen_logits.append(logits.shape)
        for step in range(3, 5):
            lm_gen.step_with_logits(user_frame(codes, lm.dep_q, step), codes[:, :1 + lm.dep_q, step:step + 1])
            assert lm_gen.on_text_hook is second
        assert len(seen_first) == 3 and len(seen_second) == 2 and len(seen_logits) == 2
        assert torch.equal(seen_second[1], codes[:, 0, 4])
        lm_gen.step(user_frame(codes, lm.dep_q, 5))             # step() calls them too
        assert len(seen_second) == 3
    assert lm_gen.on_text_hook is second


@pytest.mark.parametrize("use_sampling", [False, True], ids=["greedy", "sampled"])
def test_returned_text_logits_are_those_after_the_callers_hook(use_sampling: bool) -> None:
    """A caller's `on_text_logits_hook` that moves the argmax (as moshi's TTS edits the padding logit): the
    logits returned are the edited ones, the token is drawn from them (greedy: their argmax)."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2)
    user = random_codes(lm, 2, 10, seed=8)[:, 1 + lm.dep_q:]
    target = 5

    def boost(logits: torch.Tensor) -> None:
        logits[..., target] += 1000.

    torch.manual_seed(0)
    outs = free_run(LMGen(lm, use_sampling=use_sampling, on_text_logits_hook=boost), user)
    text = torch.cat([o.text_logits for o in outs], dim=2)
    tokens = torch.cat([o.tokens for o in outs], dim=2)
    assert (text.argmax(-1) == target).all()
    assert (tokens[:, 0] == target).all()
    if not use_sampling:
        assert torch.equal(tokens[:, 1:], torch.cat([o.audio_logits for o in outs], 2).argmax(-1))


@pytest.mark.skipif(LMGEN_UNDER_TEST == "upstream", reason="the pull request refuses frames computed by step()")
@pytest.mark.parametrize("use_sampling", [False, True], ids=["greedy", "sampled"])
def test_step_between_step_with_logits_calls_keeps_the_true_logits(use_sampling: bool) -> None:
    """5 step_with_logits, 3 step(), 2 step_with_logits (the mix that returned frame 3's logits for frame 7):
    the logits are those of a stream of step_with_logits calls alone, and the tokens those of step()."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=8)
    user = random_codes(lm, 1, 10, seed=4)[:, 1 + lm.dep_q:]
    torch.manual_seed(1)
    alone = free_run(LMGen(lm, use_sampling=use_sampling), user)
    lm_gen = LMGen(lm, use_sampling=use_sampling)
    torch.manual_seed(1)
    mixed = []
    with lm_gen.streaming(1):
        for step in range(10):
            frame = user[:, :, step:step + 1]
            if 5 <= step < 8:
                tokens = lm_gen.step(frame)
                assert torch.equal(tokens, alone[step - lm_gen.max_delay].tokens)
            else:
                mixed.append((step, lm_gen.step_with_logits(frame)))
    for step, out in mixed[-2:]:
        expected = alone[step - lm_gen.max_delay]
        assert torch.equal(out.tokens, expected.tokens)
        assert torch.isfinite(out.text_logits).all() and torch.isfinite(out.audio_logits).all()
        assert torch.equal(out.text_logits, expected.text_logits)
        assert torch.equal(out.audio_logits, expected.audio_logits)


@pytest.mark.parametrize("first", ["step", "step_with_extra_heads"])
def test_frames_computed_by_step_before_step_with_logits_are_refused(first: str) -> None:
    """A frame whose logits were (partly) computed before the stream's first step_with_logits call, or by
    `step_with_extra_heads`, cannot be returned: a RuntimeError says what to do; `reset_streaming` recovers."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2)
    user = random_codes(lm, 2, 8, seed=4)[:, 1 + lm.dep_q:]
    lm_gen = LMGen(lm, use_sampling=False)
    with lm_gen.streaming(2):
        for step in range(3):
            if first == "step":
                lm_gen.step(user[:, :, step:step + 1])
            elif step == 0:
                lm_gen.step_with_logits(user[:, :, step:step + 1])
            else:
                lm_gen.step_with_extra_heads(user[:, :, step:step + 1])
        with pytest.raises(RuntimeError, match=r"cannot return the logits of frame \d+ \(batch item 0\).*step\(\)"
                                               r".*from its start, or call `reset_streaming\(\)`"):
            lm_gen.step_with_logits(user[:, :, 3:4])
        lm_gen.reset_streaming()
        outs = [lm_gen.step_with_logits(user[:, :, step:step + 1]) for step in range(4)]
    assert outs[1] is None and torch.isfinite(outs[-1].text_logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.skipif(LMGEN_UNDER_TEST == "upstream", reason="the pull request refuses frames computed by step()")
def test_cuda_graphs_each_method_runs_its_own_depformer() -> None:
    """Under CUDA graphs (captured once per graphed function), a stream mixing step() and step_with_logits,
    forced or not, gives upstream's tokens, and a stream of step() alone too."""
    lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=8, device="cuda")
    user = random_codes(lm, 2, 14, seed=11)[:, 1 + lm.dep_q:]
    expected = upstream_tokens(lm, user, use_sampling=False, seed=0)
    assert torch.equal(upstream_tokens(lm, user, use_sampling=False, seed=0, cls=LMGen), expected)
    lm_gen = LMGen(lm, use_sampling=False)
    outs = []
    with lm_gen.streaming(2):
        for step in range(user.shape[-1]):
            frame = user[:, :, step:step + 1]
            if step % 3 == 1:
                out = lm_gen.step(frame)
            else:
                # Forcing the tokens step() chose (known from `expected`) keeps the stream on upstream's tokens.
                forced = None
                if step % 3 == 2 and step < expected.shape[-1]:
                    forced = expected[:, :, step:step + 1]
                out = lm_gen.step_with_logits(frame, forced)
                out = None if out is None else out.tokens
            if out is not None:
                outs.append(out)
    assert torch.equal(torch.cat(outs, dim=2), expected)
