"""The library API (`moshi_eval.LibriLightEvaluator`): a model in memory gives the CLI's numbers bit for bit,
books are encoded once for any number of calls, and the model comes back as it was given."""
import csv
import dataclasses

import numpy as np
import pytest
import torch

from helpers.cli_helpers import FAST, librilight_args, make_world, results, sequences
from helpers.checkpoint_factory import load_tiny_checkpoint
from moshi_eval import LibriLightConfig, LibriLightEvaluator, flat_metrics
from moshi_eval.files import report
from moshi_eval.cli.commands import main
from moshi_eval.data.codes import silence_codes
from moshi_eval.data.librilight import DataError
from moshi_eval.data.codes import SILENCE_FRAMES

OPTIONS = ["--batch-size", "2", "--report-at", "10,40,5000", "--report-window", "5", "--bucket", "20",
           "--bootstrap", "200"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("evaluator"))


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # as the CLI's --threads 1: the same reductions, bit for bit
    yield
    torch.set_num_threads(threads)


def _config(world, **overrides) -> LibriLightConfig:
    base = LibriLightConfig(audio_dir=world["audio"], batch_size=2, report_at=(10, 40, 5000), report_window=5,
                            bucket=20, bootstrap=200)
    return dataclasses.replace(base, **overrides)


def _encoder_calls(mimi) -> list[int]:
    calls = [0]
    mimi.encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_model_in_memory_equals_cli_bitwise(world, tmp_path, one_thread):
    cli_out = tmp_path / "cli"
    assert main(librilight_args(world, cli_out, *OPTIONS)) == 0
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    evaluator = LibriLightEvaluator(mimi, _config(world), cache_dir=world["cache"])
    result = evaluator(lm)

    cli_books = sequences(cli_out)
    assert sorted(result.sequences) == sorted(cli_books) and len(cli_books) == 3
    for sid, arrays in result.sequences.items():
        for name in report.SEQUENCE_ARRAYS:
            np.testing.assert_array_equal(arrays[name], cli_books[sid][name])
    cli_results = results(cli_out)
    assert result.metrics == flat_metrics(cli_results["summary"])
    # Names are documented and stable; a report frame no book reaches (5000) is left out, never 0.0.
    assert {"librilight/audio_ce@10", "librilight/audio_ce@40/low", "librilight/audio_ce@40/high",
            "librilight/audio_ce/slope_per_1000", "librilight/codebook_0_ce@10",
            "librilight/num_books"} <= set(result.metrics)
    assert not any("@5000" in name for name in result.metrics)
    assert result.metrics["librilight/num_books"] == 3.0
    # The metric is the curve's window mean, recomputed here from the per-book arrays.
    T = max(len(a["audio_ce"]) for a in result.sequences.values())
    curve = np.stack([np.pad(a["audio_ce"].astype(np.float64), (0, T - len(a["audio_ce"])),
                             constant_values=np.nan) for a in result.sequences.values()])
    window = np.nanmean(curve, axis=0)[5:16]
    assert result.metrics["librilight/audio_ce@10"] == pytest.approx(window.mean(), rel=1e-12)

    written = result.write(tmp_path / "api")
    api_results = report_json = results(tmp_path / "api")
    assert written == tmp_path / "api" / "results.json"
    assert api_results["metrics"] == cli_results["metrics"]
    assert report_json["config"]["report_at"] == cli_results["config"]["report_at"]
    assert (tmp_path / "api" / report.CURVE_CSV).read_text() == (cli_out / report.CURVE_CSV).read_text()
    assert (tmp_path / "api" / report.CURVE_PNG).stat().st_size > 0
    api_books = sequences(tmp_path / "api")
    for sid in cli_books:
        for name in report.SEQUENCE_ARRAYS:
            np.testing.assert_array_equal(api_books[sid][name], cli_books[sid][name])
    with open(tmp_path / "api" / report.CURVE_CSV) as f:
        assert len(list(csv.reader(f))) > 1


def test_called_twice_encodes_once_and_model_comes_back_as_given(world, one_thread):
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    calls = _encoder_calls(mimi)
    evaluator = LibriLightEvaluator(mimi, _config(world, bootstrap=0), use_cache=False)
    encoded = calls[0]
    assert encoded > 0

    # A model being trained: training mode with one submodule frozen in eval mode, one frozen parameter,
    # gradients held from a backward pass.
    lm.train()
    lm.depformer.eval()
    frozen = lm.text_emb.weight
    frozen.requires_grad_(False)
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, 12))
    codes[:, 0] = torch.randint(0, lm.text_card, (1, 12))

    def forward_logits():
        with torch.no_grad():
            out = lm.forward(codes)
        return out.logits.clone(), out.text_logits.clone()

    lm.zero_grad()
    sum(p.float().pow(2).sum() for p in lm.parameters() if p.requires_grad).backward()
    grads = {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}
    modes = {name: m.training for name, m in lm.named_modules()}
    flags = {name: p.requires_grad for name, p in lm.named_parameters()}
    before = forward_logits()

    first = evaluator(lm)

    assert {name: m.training for name, m in lm.named_modules()} == modes
    assert {name: p.requires_grad for name, p in lm.named_parameters()} == flags
    assert {name for name, p in lm.named_parameters() if p.grad is not None} == set(grads)
    for name, p in lm.named_parameters():
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name
    after = forward_logits()
    for a, b in zip(before, after):      # NaN where forward marks a position invalid
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert not lm.is_streaming

    # Scored in eval mode: the same numbers as the model put in eval mode by the caller.
    lm.eval()
    assert evaluator(lm).metrics == first.metrics
    lm.train()

    # A training step between calls: new numbers, nothing encoded again.
    torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.5).step()
    second = evaluator(lm)
    assert calls[0] == encoded
    assert second.metrics["librilight/audio_ce"] != first.metrics["librilight/audio_ce"]


def test_code_cache_shared_with_cli(world, tmp_path):
    # The CLI filled the default-layout cache in `world["cache"]` (first test, or here): no encoding at all.
    assert main(librilight_args(world, tmp_path / "cli", "--bootstrap", "0")) == 0
    _, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    calls = _encoder_calls(mimi)
    evaluator = LibriLightEvaluator(mimi, _config(world, bootstrap=0), cache_dir=world["cache"])
    assert evaluator.cache is not None and evaluator.cache.hits > 0
    assert evaluator.cache.misses == 0
    # Only the user stream's silence codes are encoded (they are not cached, as in the CLI).
    encoded = calls[0]
    silence_codes(mimi, SILENCE_FRAMES)
    assert encoded == calls[0] - encoded


def test_bad_model_and_config_named(world):
    _, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    evaluator = LibriLightEvaluator(mimi, _config(world, bootstrap=0, max_frames=8), use_cache=False)
    with pytest.raises(TypeError, match="lm_model: expected a moshi LMModel"):
        evaluator(torch.nn.Linear(2, 2))
    lm, _, _ = load_tiny_checkpoint(world["ckpt"])
    with lm.streaming(1):
        with pytest.raises(ValueError, match="streaming"):
            evaluator(lm)
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\): expected a positive integer"):
        LibriLightConfig(audio_dir=world["audio"], batch_size=0)
    with pytest.raises(ValueError, match="audio_dir"):
        LibriLightEvaluator(mimi, LibriLightConfig())
    with pytest.raises(DataError, match="every book is shorter"):
        LibriLightEvaluator(mimi, _config(world, min_frames=10_000), use_cache=False)


def test_config_field_names_match_cli_flags():
    from moshi_eval.cli.commands import build_parser
    parser = build_parser()
    args = parser.parse_args(["librilight", "--audio-dir", "x", "--out", "y", "--no-progress"])
    names = {f.name for f in dataclasses.fields(LibriLightConfig)}
    assert names <= set(vars(args)), names - set(vars(args))
    defaults = LibriLightConfig(audio_dir="x")
    for name in names - {"audio_dir"}:
        assert getattr(defaults, name) == getattr(args, name), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_model_keeps_its_device_and_dtype(world, device):
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"], dtype=torch.bfloat16)
    lm = lm.to(device)
    evaluator = LibriLightEvaluator(mimi, _config(world, bootstrap=0, max_frames=20), use_cache=False)
    result = evaluator(lm)
    assert {(p.device.type, p.dtype) for p in lm.parameters()} == {(device, torch.bfloat16)}
    assert all(np.isfinite(v) for v in result.metrics.values()) and result.metrics["librilight/num_books"] == 3
    assert {a["audio_ce"].dtype for a in result.sequences.values()} == {np.dtype(np.float32)}


def test_evaluator_verifies_a_model_with_unknown_streaming_layers(world):
    """As the CLI: a streaming layer the project does not know, whose chunked path differs from one frame per
    call, stops the call with the verdict instead of returning numbers; `verify_streaming=False` skips it."""
    from moshi.modules.streaming import StreamingModule
    from moshi_eval.scoring.streaming import StreamingCheckError
    from test_check_streaming import AttributeStateLayer
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    lm.transformer.layers.insert(1, AttributeStateLayer())
    for module in lm.modules():
        if isinstance(module, StreamingModule):
            module._cached_children = None
    config = _config(world, bootstrap=0, max_frames=20, text="predicted", chunk=8)
    with pytest.raises(StreamingCheckError, match=r"transformer\.layers\.1 \(AttributeStateLayer\)"):
        LibriLightEvaluator(mimi, config, use_cache=False)(lm)
    result = LibriLightEvaluator(mimi, dataclasses.replace(config, verify_streaming=False), use_cache=False)(lm)
    assert result.metrics["librilight/num_books"] == 3
