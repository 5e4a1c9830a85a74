"""`moshi-eval check-streaming` (moshi_eval.scoring.streaming): consistent models pass, a layer whose streaming path
differs from its sequence path is caught, with the frame where it starts."""
from dataclasses import dataclass, field
import math

from moshi.modules.streaming import State, StreamingModule
import numpy as np
import pytest
import torch

import moshi_eval.scoring.streaming as check
import moshi_eval.cli.check_streaming as check_command
from moshi_eval.scoring.streaming import DIVERGENCE_MEANING, check_streaming
from moshi_eval.cli.commands import main
from moshi_eval.scoring.sequences import score_sequences
from moshi_patch import LMGen
from moshi_patch.chunking import MultiFrameStreamingError
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
    monkeypatch.setattr(check_command, "demo_lm", lambda seed, device, dtype: make_lm(context=8, dim=32))
    monkeypatch.setattr(check_command, "add_ttt_layers", _forgetful_into)
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
    assert "--ttt-layers) 0,5" in capsys.readouterr().err
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

    monkeypatch.setattr(check_command, "demo_lm", lambda seed, device, dtype: make_lm(context=8, dim=32))
    monkeypatch.setattr(check_command, "add_ttt_layers", add_one_frame_layer)
    code = main(["check-streaming", "--demo", "--ttt-layers", "0", "--frames", "12", "--device", "cpu",
                 "--chunk", "4"])
    err = capsys.readouterr().err
    assert code == 1
    assert "transformer.layers.2 (OneFrameOnly)" in err and "--chunk 1" in err


# Item 6: custom layers whose state is not moshi-style. Both are what a researcher might write.

class AttributeStateLayer(StreamingModule):
    """A running sum of its inputs added to them, the sum kept in a module attribute (its moshi State is
    empty). Right over whole sequences, one frame or several per call; but the rollback of a wrong text
    guess cannot restore it."""
    supports_multi_frame_streaming = True

    def __init__(self):
        super().__init__()
        self.running = None

    def _init_streaming_state(self, batch_size):
        self.running = None
        return State(batch_size, torch.device("cpu"))

    def forward(self, x, *args, **kwargs):
        total = torch.cumsum(x, dim=1)
        if self._streaming_state is not None:
            if self.running is not None:
                total = total + self.running[:, None]
            self.running = total[:, -1]
        return x + 2.0 * torch.tanh(total)


@dataclass
class _HistoryState(State):
    history: list = field(default_factory=list)


class ListStateLayer(StreamingModule):
    """Identity, with a Python list in its State (the eval's rollback cannot snapshot it)."""
    supports_multi_frame_streaming = True

    def _init_streaming_state(self, batch_size):
        return _HistoryState(batch_size, torch.device("cpu"))

    def forward(self, x, *args, **kwargs):
        if self._streaming_state is not None:
            self._streaming_state.history.append(x.shape[1])
        return x


def _with_layer(layer, at=1, reset_cache=True, **kwargs):
    lm = make_lm(context=16, dim=32, **kwargs)
    lm.transformer.layers.insert(at, layer)
    if reset_cache:
        for module in lm.modules():
            if isinstance(module, StreamingModule):
                module._cached_children = None
    return lm


def _eval_losses(lm, codes, chunk, text):
    """The eval's own scoring (`scoring.sequences.score_sequences`), an independent path to the check's verdict."""
    return [r.audio_ce for r in score_sequences(LMGen(lm, use_sampling=False), codes, user_stream="zero", text=text,
                                                chunk=chunk, progress=False)]


def test_attribute_state_layer_is_caught_on_the_predicted_text_path():
    lm = _with_layer(AttributeStateLayer())
    # Forced text (all the check ran before): consistent, since no rollback happens.
    assert check_streaming(lm, frames=40, batch_size=2, chunk=8, text_paths=("forced",)).consistent
    # The eval's default path (chunks, predicted text) really differs from one frame per call:
    codes = [torch.randint(0, lm.card, (lm.dep_q, 40), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    chunked, one = _eval_losses(lm, codes, 8, "predicted"), _eval_losses(lm, codes, 1, "predicted")
    assert max(float(np.abs(a - b).max()) for a, b in zip(chunked, one)) > 1e-2
    result = check_streaming(lm, frames=40, batch_size=2, chunk=8)
    assert not result.consistent
    by_text = {p.text: p for p in result.paths}
    assert by_text["forced"].consistent and by_text["pad"].consistent
    predicted = by_text["predicted"]
    assert not predicted.consistent and predicted.refused is None
    assert predicted.module is not None
    assert (predicted.module.name, predicted.module.kind) == ("transformer.layers.1", "AttributeStateLayer")
    assert "transformer.layers.1.running" in predicted.state_outside
    text = result.format()
    assert "text predicted, 8-frame chunks vs one frame per call: DIVERGES" in text
    assert "first module whose output differs: transformer.layers.1 (AttributeStateLayer)" in text


def test_list_state_layer_is_reported_as_refused_by_the_eval():
    lm = _with_layer(ListStateLayer())
    with pytest.raises(MultiFrameStreamingError, match="field 'history' is a list"):
        _eval_losses(lm, [torch.zeros(lm.dep_q, 20, dtype=torch.long)], 8, "predicted")
    result = check_streaming(lm, frames=20, batch_size=1, chunk=8)
    assert not result.consistent
    predicted = next(p for p in result.paths if p.text == "predicted")
    assert predicted.refused is not None and "field 'history' is a list" in predicted.refused
    assert "REFUSED by the eval" in result.format()


def test_a_layer_inserted_after_the_model_streamed_is_flagged():
    lm = make_lm(context=16, dim=32)
    with LMGen(lm, use_sampling=False).streaming(1):
        pass
    lm.transformer.layers.append(ListStateLayer())          # moshi's cached streaming children miss it
    result = check_streaming(lm, frames=8, batch_size=1, chunk=1)
    assert result.unstreamed == ["transformer.layers.2"]
    assert not result.consistent and "NOT STREAMED: transformer.layers.2" in result.format()


def test_cli_names_the_module_by_default(capsys, monkeypatch):
    monkeypatch.setattr(check_command, "demo_lm", lambda seed, device, dtype: _with_layer(AttributeStateLayer()))
    code = main(["check-streaming", "--demo", "--frames", "40", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "text predicted, 16-frame chunks" in out and "transformer.layers.1 (AttributeStateLayer)" in out


def test_eval_verifies_a_model_with_unknown_streaming_layers(tmp_path, monkeypatch, capsys):
    from moshi_eval import demo

    real = demo.demo_lm

    def with_layer(seed, *args, **kwargs):
        lm = real(seed, *args, **kwargs)
        lm.transformer.layers.insert(1, AttributeStateLayer())
        for module in lm.modules():
            if isinstance(module, StreamingModule):
                module._cached_children = None
        return lm

    monkeypatch.setattr(demo, "demo_lm", with_layer)
    common = ["demo", "--max-frames", "40", "--no-progress", "--bootstrap", "10", "--report-at", "10,20",
              "--report-window", "5", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "streaming modules this project does not know (transformer.layers.1 (AttributeStateLayer))" in err
    assert "transformer.layers.1 (AttributeStateLayer) at frame" in err and "--no-verify-streaming" in err
    assert not list((tmp_path / "a").glob("sequences/*.npz"))
    assert main([*common, "--out", str(tmp_path / "b"), "--no-verify-streaming"]) == 0
    # Known layers (moshi's own, TTT): nothing to verify, nothing said.
    monkeypatch.setattr(demo, "demo_lm", real)
    assert main([*common, "--out", str(tmp_path / "c")]) == 0
    assert "verified streaming" not in capsys.readouterr().err
