"""LikelihoodEvaluator: prepared once (files encoded once across calls), bitwise the CLI's numbers, the model
restored as given (also after an exception in the middle of a call), several evaluators merged into one flat
dict, and the loggers and `moshi-eval likelihood --tensorboard` on likelihood results."""
import csv
import json
from pathlib import Path
import sys
import types

import numpy as np
import pytest
import torch
from moshi.models import loaders
from moshi.modules.transformer import StreamingMultiheadAttention

from helpers.checkpoint_factory import load_tiny_checkpoint, make_tiny_mimi, tiny_lm_config, write_tiny_checkpoint
from moshi_eval import (EvalResults, Evaluators, LibriLightConfig, LibriLightEvaluator, LikelihoodConfig,
                        LikelihoodEvaluator, loggers)
from moshi_eval.tasks import likelihood as likelihood_module
from moshi_eval.cli.commands import main
from moshi_eval.demo import demo_minimal_pairs
from test_likelihood import forward_log_likelihood, make_storycloze, make_zerospeech


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("likev")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    make_zerospeech(root / "zr", "syntactic", ids=3, voices=2, seed=2)
    return {"root": root, "ckpt": ckpt, "data": root / "zr"}


def _config(world, **kw) -> LikelihoodConfig:
    return LikelihoodConfig(**{"task": "sblimp", "data": world["data"], "text": "zero", "batch_size": 3,
                               "bootstrap": 100, "progress": False, **kw})


def _items(out: Path) -> dict[str, dict]:
    return {r["file"]: r for r in csv.DictReader(open(out / "items.csv"))}


def test_evaluator_equals_the_cli_bitwise_and_writes_its_files(world, tmp_path):
    cli_out = tmp_path / "cli"
    assert main(["likelihood", "--task", "sblimp", "--data", str(world["data"]), "--out", str(cli_out),
                 "--no-cache", "--threads", "1", "--no-progress", "--text", "zero", "--batch-size", "3",
                 "--bootstrap", "100", *world["ckpt"]["cli_args"]]) == 0
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    evaluator = LikelihoodEvaluator(mimi, _config(world))
    result = evaluator(lm)
    cli = json.loads((cli_out / "results.json").read_text())
    assert result.metrics == cli["metrics"] and "sblimp/accuracy" in result.metrics
    assert {"sblimp/accuracy/low", "sblimp/accuracy/high"} <= set(result.metrics)
    lib_out = tmp_path / "lib"
    result.write(lib_out)
    assert (lib_out / "items.csv").read_bytes() == (cli_out / "items.csv").read_bytes()
    assert (lib_out / "pairs.csv").read_bytes() == (cli_out / "pairs.csv").read_bytes()
    sub = Path("submission") / "syntactic" / "dev.txt"
    assert (lib_out / sub).read_bytes() == (cli_out / sub).read_bytes()
    lib = json.loads((lib_out / "results.json").read_text())
    assert lib["accuracy"] == cli["accuracy"] and lib["accuracy_per_token"] == cli["accuracy_per_token"]
    # The per-file numbers are those of LMModel.forward on the same codes (an independent computation).
    for key, row in list(_items(cli_out).items())[:3]:
        expected, _ = forward_log_likelihood(lm, mimi, world["data"] / "syntactic" / "dev" / f"{key}.wav",
                                             "zero", "silence")
        np.testing.assert_allclose(float(row["log_likelihood"]), expected, rtol=1e-5, atol=2e-3)


def test_files_are_encoded_once_across_calls(world, monkeypatch):
    calls = []
    real = likelihood_module.encode_audio

    def counting(mimi, wav, *args, **kwargs):
        calls.append(wav.shape)
        return real(mimi, wav, *args, **kwargs)

    monkeypatch.setattr(likelihood_module, "encode_audio", counting)
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    evaluator = LikelihoodEvaluator(mimi, _config(world))
    files = len(evaluator.data.files)
    assert len(calls) == files == 12
    first = evaluator(lm)
    with torch.no_grad():          # a "training step" between two calls
        for p in lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    second = evaluator(lm)
    assert len(calls) == files     # nothing re-encoded
    assert any(first.scores[k].log_likelihood != second.scores[k].log_likelihood for k in first.scores)
    # ... and the second call's numbers are those of a fresh evaluation of the changed model.
    fresh = likelihood_module.evaluate_likelihood(lm, mimi, _config(world))
    assert {k: s.log_likelihood for k, s in fresh.scores.items()} == \
        {k: s.log_likelihood for k, s in second.scores.items()}
    assert fresh.metrics == second.metrics
    # The one-shot path (evaluate_likelihood, the CLI): each file encoded once, while its batch is scored, and
    # no codes kept after it (memory flat in the number of files).
    calls.clear()
    lazy = LikelihoodEvaluator(mimi, _config(world), encode=False)
    assert not calls
    lazy_result = lazy(lm)
    assert len(calls) == files and lazy._encoded == {}
    assert {k: s.log_likelihood for k, s in lazy_result.scores.items()} == \
        {k: s.log_likelihood for k, s in second.scores.items()}


def _state(lm):
    return ({name: m.training for name, m in lm.named_modules()},
            {name: (p.detach().clone(), p.requires_grad, p.dtype, p.device) for name, p in lm.named_parameters()},
            {id(m): m.context for m in lm.transformer.modules() if isinstance(m, StreamingMultiheadAttention)})


def _assert_same_state(lm, before):
    modes, params, contexts = _state(lm)
    assert modes == before[0]
    for name, (value, requires_grad, dtype, device) in params.items():
        ref = before[1][name]
        assert (requires_grad, dtype, device) == ref[1:]
        torch.testing.assert_close(value, ref[0], rtol=0, atol=0)
    assert contexts == before[2]
    assert not lm.is_streaming
    assert all(p.grad is None for p in lm.parameters())


def test_model_state_restored_also_after_an_exception_mid_call(tmp_path):
    """A model in training mode (one submodule in eval), frozen parameters, a 200-frame context that the call
    shrinks to the batch (`kv_sized_to`): all as given after a call and after a call that raises in the middle
    of scoring; the next call then gives the numbers of the first."""
    torch.manual_seed(3)
    lm = loaders.get_moshi_lm(None, lm_kwargs=tiny_lm_config(card=64, context=200), device="cpu",
                              dtype=torch.float32)
    lm.train()
    lm.out_norm.eval()
    lm.text_emb.weight.requires_grad_(False)
    mimi = make_tiny_mimi(0, bins=64)
    root = make_storycloze(tmp_path / "sc", stories=3)
    evaluator = LikelihoodEvaluator(mimi, LikelihoodConfig("sstorycloze", root, text="pad", bootstrap=0,
                                                           batch_size=2, progress=False))
    before = _state(lm)
    first = evaluator(lm)
    _assert_same_state(lm, before)

    seen = {}
    layer = lm.transformer.layers[0]

    def fail(module, args):
        seen["training"] = module.training
        seen["grad"] = torch.is_grad_enabled()
        seen["contexts"] = {m.context for m in lm.transformer.modules()
                            if isinstance(m, StreamingMultiheadAttention)}
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 3:
            raise RuntimeError("injected failure mid-call")

    handle = layer.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected failure mid-call"):
            evaluator(lm)
    finally:
        handle.remove()
    # The hook saw the call's state: eval mode, no autograd, the context shrunk to the batch.
    assert seen["training"] is False and seen["grad"] is False and max(seen["contexts"]) < 200
    _assert_same_state(lm, before)
    again = evaluator(lm)
    assert {k: s.log_likelihood for k, s in again.scores.items()} == \
        {k: s.log_likelihood for k, s in first.scores.items()}


def test_evaluators_merge_librilight_and_likelihood_metrics(world, tmp_path):
    from helpers.checkpoint_factory import write_librilight_folder
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    audio = write_librilight_folder(tmp_path / "libri", books=2, chapters=1, seconds=[2.0, 1.5], seed=4)
    pairs = demo_minimal_pairs(tmp_path / "pairs")
    libri = LibriLightEvaluator(mimi, LibriLightConfig(audio_dir=audio, batch_size=2, report_at=[10],
                                                       report_window=5, bucket=10, bootstrap=50), use_cache=False)
    sc = LikelihoodEvaluator(mimi, LikelihoodConfig("sstorycloze", pairs, text="zero", bootstrap=50,
                                                    progress=False))
    sb = LikelihoodEvaluator(mimi, _config(world))
    evaluate_all = Evaluators([libri, sc, sb])
    merged = evaluate_all(lm)
    assert isinstance(merged, EvalResults) and list(merged.results) == ["librilight", "sstorycloze", "sblimp"]
    alone = {**libri(lm).metrics, **sc(lm).metrics, **sb(lm).metrics}
    assert merged.metrics == alone
    assert len(merged.metrics) == len(libri(lm).metrics) + len(sc(lm).metrics) + len(sb(lm).metrics)
    assert "librilight/audio_ce" in merged.metrics and "sstorycloze/accuracy" in merged.metrics
    # Named evaluators: the name is the prefix (two of one task).
    named = Evaluators({"sblimp_a": sb, "sblimp_b": LikelihoodEvaluator(mimi, _config(world, text="pad"))})(lm)
    assert named.metrics["sblimp_a/accuracy"] == sb(lm).metrics["sblimp/accuracy"]
    assert all(k.startswith(("sblimp_a/", "sblimp_b/")) for k in named.metrics)
    with pytest.raises(ValueError, match=r"two evaluators named \['sblimp'\]"):
        Evaluators([sb, sb])
    with pytest.raises(TypeError, match="evaluators: expected"):
        Evaluators([object()])
    paths = merged.write(tmp_path / "step")
    assert (tmp_path / "step" / "librilight" / "results.json").is_file()
    assert (tmp_path / "step" / "sblimp" / "items.csv").is_file() and set(paths) == set(merged.results)

    class Writer:      # the SummaryWriter calls log_tensorboard makes
        def __init__(self):
            self.scalars, self.images = {}, []

        def add_scalar(self, name, value, step):
            self.scalars[name] = (value, step)

        def add_image(self, name, image, step, dataformats):
            self.images.append((name, image.shape, dataformats))

        def flush(self):
            pass

    writer = Writer()
    loggers.log_tensorboard(writer, merged, step=7)
    assert writer.scalars == {k: (v, 7) for k, v in merged.metrics.items()}
    assert [name for name, _, _ in writer.images] == ["librilight/curve"]
    writer = Writer()
    loggers.log_tensorboard(writer, merged.results["sblimp"], step=3)
    assert writer.scalars == {k: (v, 3) for k, v in sb(lm).metrics.items()} and not writer.images


def test_cli_likelihood_tensorboard(world, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, tb = tmp_path / "run", tmp_path / "tb"
    assert main(["likelihood", "--task", "sblimp", "--data", str(world["data"]), "--out", str(out), "--no-cache",
                 "--threads", "1", "--no-progress", "--text", "zero", "--batch-size", "3", "--bootstrap", "100",
                 "--tensorboard", str(tb), "--log-step", "5", *world["ckpt"]["cli_args"]]) == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(metrics)
    for name, value in metrics.items():
        (event,) = acc.Scalars(name)
        assert event.step == 5 and event.value == pytest.approx(value, rel=1e-6)


def test_cli_likelihood_logs_its_metrics_to_wandb_and_tensorboard(world, tmp_path, monkeypatch):
    """`moshi-eval likelihood --wandb --tensorboard` (recording stand-ins for the two packages, as in
    test_loggers.py): results.json's flat metrics, at the given step, no curve."""
    from test_loggers import _fake_wandb, _Recorder
    runs = _fake_wandb(monkeypatch)
    writers: list = []
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setattr(loggers, "summary_writer", lambda d: writers.append(_Recorder(log_dir=d)) or writers[-1])
    out = tmp_path / "run"
    assert main(["likelihood", "--task", "sblimp", "--data", str(world["data"]), "--out", str(out), "--no-cache",
                 "--threads", "1", "--no-progress", "--text", "zero", "--batch-size", "3", "--bootstrap", "100",
                 "--wandb", "proj/lik", "--tensorboard", str(tmp_path / "tb"), "--log-step", "4",
                 *world["ckpt"]["cli_args"]]) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert "sblimp/accuracy" in metrics
    (run,) = runs
    assert run.init["project"] == "proj" and run.init["name"] == "lik" and run.finished
    assert run.init["config"] == results["config"]
    assert run.logged == [(metrics, 4)] and run.summary == metrics
    (writer,) = writers
    assert writer.scalars == {k: (v, 4) for k, v in metrics.items()} and not writer.images and writer.closed


@pytest.mark.parametrize("flag,package", [("--wandb", "wandb"), ("--tensorboard", "tensorboard")])
def test_cli_likelihood_missing_logger_package_stops_before_scoring(world, tmp_path, monkeypatch, capsys, flag,
                                                                    package):
    monkeypatch.setitem(sys.modules, package, None)     # `import package` raises ImportError
    out = tmp_path / "run"
    code = main(["likelihood", "--task", "sblimp", "--data", str(world["data"]), "--out", str(out),
                 "--no-cache", "--no-progress", flag, str(tmp_path / "x"), *world["ckpt"]["cli_args"]])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{flag} needs the {package} package" in err and f"moshi-patch[{package}]" in err
    assert not out.exists()


def test_a_codec_that_does_not_fit_the_model_is_named(world):
    """A model whose audio stream takes fewer codebooks than the codec gives is refused before any scoring,
    naming both counts (it used to be scored on a silent slice of the codes)."""
    from moshi_eval.checkpoint import CheckpointError
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    evaluator = LikelihoodEvaluator(mimi, _config(world))
    lm.dep_q -= 1        # what a model built for fewer codebooks reports
    with pytest.raises(CheckpointError, match=rf"codec gives {mimi.num_codebooks} codebooks.*dep_q = {lm.dep_q}"):
        evaluator(lm)
