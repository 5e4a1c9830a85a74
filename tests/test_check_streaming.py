"""`moshi-eval check-streaming` (moshi_eval.check): consistent models pass, a layer whose streaming path
differs from its sequence path is caught, with the frame where it starts."""
import math

import pytest
import torch

import moshi_eval.check as check
from moshi_eval.check import DIVERGENCE_MEANING, check_streaming
from moshi_eval.cli import main
from moshi_patch.ttt import TTTLinear, add_ttt_layers, ttt_layers

from helpers.lm_factory import make_lm, ttt_lm


class ForgetfulTTT(TTTLinear):
    """The bug the check exists for: a streaming path that restarts from the initial inner weights at every
    call, while the sequence path (LMModel.forward) carries them."""

    def _stream(self, state, q, k, v, lr):
        state.reset(torch.ones_like(state.exec_mask))
        return super()._stream(state, q, k, v, lr)


def tiny_ttt_lm(forgetful: bool = False, **kwargs):
    lm = ttt_lm(context=8, ttt_seed=0, **kwargs)
    if forgetful:
        for block in ttt_layers(lm):
            block.__class__ = ForgetfulTTT
    return lm


def test_consistent_ttt_model_passes():
    result = check_streaming(tiny_ttt_lm(max_delay=2), frames=20, batch_size=2, seed=3)
    assert result.consistent and result.first_divergent_frame is None
    assert [s.name for s in result.streams] == ["text", "audio 0", "audio 1"]
    for stream in result.streams:
        assert stream.max_abs < 1e-4 and 0 <= stream.mean_abs <= stream.max_abs
        assert stream.frames_compared >= 18     # delayed codebooks lose their last max_delay frames
    assert result.tolerance == 1e-4
    assert "CONSISTENT" in result.format()


def test_layer_whose_streaming_forgets_its_state_is_caught():
    result = check_streaming(tiny_ttt_lm(forgetful=True), frames=20, batch_size=2)
    assert not result.consistent
    text = result.streams[0]
    # Frame 0 of the text sees one token: a fresh state is the right state there. Frame 1 is not.
    assert text.first_divergent_frame == 1
    assert text.max_abs > 1e-2
    assert result.first_divergent_frame in (0, 1)
    out = result.format()
    assert f"INCONSISTENT from frame {result.first_divergent_frame}" in out and DIVERGENCE_MEANING in out


def test_nan_in_streamed_logits_is_a_divergence():
    reference = torch.zeros(1, 3, 4)
    streamed = reference.clone()
    streamed[0, 2, 1] = float("nan")
    diff = check._compare("text", streamed, reference, torch.ones(1, 3, dtype=torch.bool), 1e-4)
    assert diff.first_divergent_frame == 2 and math.isinf(diff.max_abs)
    # ... unless forward marks that position invalid too.
    mask = torch.tensor([[True, True, False]])
    assert check._compare("text", streamed, reference, mask, 1e-4).first_divergent_frame is None


def test_bad_arguments():
    lm = tiny_ttt_lm()
    with pytest.raises(ValueError, match="frames"):
        check_streaming(lm, frames=0)
    with pytest.raises(ValueError, match="tolerance"):
        check_streaming(lm, frames=4, tolerance=0.0)
    with pytest.raises(ValueError, match="training mode"):
        check_streaming(lm.train(), frames=4)


def test_cli_demo_model_with_ttt_layers(capsys):
    code = main(["check-streaming", "--demo", "--ttt-layers", "0,1", "--mini-batch-size", "4",
                 "--frames", "12", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "float32" in out and "audio 7" in out and "CONSISTENT" in out


def test_cli_exit_1_on_inconsistent_model(capsys, monkeypatch):
    monkeypatch.setattr(check, "demo_lm", lambda seed, device, dtype: make_lm(context=8, dim=32))
    monkeypatch.setattr(check, "add_ttt_layers", _forgetful_into)
    code = main(["check-streaming", "--demo", "--ttt-layers", "0", "--frames", "12", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "INCONSISTENT from frame" in out


def _forgetful_into(lm, layers, mini_batch_size):
    add_ttt_layers(lm, layers, mini_batch_size=mini_batch_size)
    for block in ttt_layers(lm):
        block.__class__ = ForgetfulTTT
    return lm


def test_cli_usage_errors(capsys, tmp_path):
    assert main(["check-streaming", "--demo", "--ttt-layers", "0,5", "--frames", "4", "--device", "cpu"]) == 2
    assert "--ttt-layers 0,5" in capsys.readouterr().err
    assert main(["check-streaming", "--demo", "--frames", "0", "--device", "cpu"]) == 2
    assert "--frames" in capsys.readouterr().err
    # A checkpoint that cannot be loaded is a usage error (2), not an inconsistency (1).
    assert main(["check-streaming", "--config", str(tmp_path / "missing.json"), "--moshi-weight",
                 str(tmp_path / "missing.safetensors"), "--device", "cpu"]) == 2
    assert "missing" in capsys.readouterr().err


class ChunkForgetfulTTT(TTTLinear):
    """Right one frame per call, wrong over chunks: it forgets its state when given several frames."""

    def _stream(self, state, q, k, v, lr):
        if q.shape[2] > 1:
            state.reset(torch.ones_like(state.exec_mask))
        return super()._stream(state, q, k, v, lr)


def test_chunked_check_passes_and_compares_with_one_frame_path():
    result = check_streaming(tiny_ttt_lm(max_delay=2), frames=20, batch_size=2, seed=3, chunk=6)
    assert result.consistent and result.chunk == 6
    assert [s.name for s in result.chunk_streams] == ["text", "audio 0", "audio 1"]
    assert all(s.frames_compared == 20 and s.max_abs < 1e-4 for s in result.chunk_streams)
    assert "6-frame chunks vs one frame per call" in result.format()


def test_chunked_check_catches_a_layer_wrong_over_chunks():
    lm = tiny_ttt_lm()
    assert check_streaming(lm, frames=20, batch_size=2).consistent      # one frame per call: right
    for block in ttt_layers(lm):
        block.__class__ = ChunkForgetfulTTT
    result = check_streaming(lm, frames=20, batch_size=2, chunk=5)
    assert not result.consistent
    # The second chunk (frame 5 on) starts from a forgotten state, in both comparisons.
    assert result.chunk_streams[0].first_divergent_frame == 5
    assert result.streams[0].first_divergent_frame == 5


def test_cli_chunk_with_a_module_that_cannot_take_chunks(capsys, monkeypatch):
    from moshi.modules.streaming import State, StreamingModule

    class OneFrameOnly(StreamingModule):
        def _init_streaming_state(self, batch_size):
            return State(batch_size, torch.device("cpu"))

        def forward(self, x, *args, **kwargs):
            return x

    def add_one_frame_layer(lm, layers, mini_batch_size):
        lm.transformer.layers.append(OneFrameOnly())
        for module in lm.modules():
            if isinstance(module, StreamingModule):
                module._cached_children = None
        return lm

    monkeypatch.setattr(check, "demo_lm", lambda seed, device, dtype: make_lm(context=8, dim=32))
    monkeypatch.setattr(check, "add_ttt_layers", add_one_frame_layer)
    code = main(["check-streaming", "--demo", "--ttt-layers", "0", "--frames", "12", "--device", "cpu",
                 "--chunk", "4"])
    err = capsys.readouterr().err
    assert code == 1
    assert "transformer.layers.2 (OneFrameOnly)" in err and "--chunk 1" in err
