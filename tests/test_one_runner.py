"""Faults injected into runs of every task through the one runner and the one output folder: a foreign batch
file, a kill between the final writes, a run of the other task in `--out`, a full disk, re-recorded audio, a
folder being written while compared, a layer inserted after a first call, chapters replaced after scoring,
loggers that cannot log, edited batch values, temporaries of killed writes."""
import csv
import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import torch

from helpers.checkpoint_factory import load_tiny_checkpoint, write_tiny_checkpoint
from helpers.cli_helpers import FAST, librilight_args, make_world
from moshi_eval import LibriLightConfig, LibriLightEvaluator, LikelihoodConfig, LikelihoodEvaluator
from moshi_eval.cli.commands import main
from moshi_eval.files import folder as folder_module
from moshi_eval.files.folder import ConfigMismatchError
from moshi_eval.files.hashing import file_sha256
from moshi_eval.files.lock import OutputBusyError, OutputLock
from test_likelihood import make_zerospeech


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    world = make_world(root)
    world["other_ckpt"] = write_tiny_checkpoint(root / "other_ckpt", seed=1)
    make_zerospeech(root / "zr", "lexical", ids=3, voices=2, seed=2)
    world["zr"] = root / "zr"
    return world


def _lik(world, out: Path, *extra: str, ckpt: dict | None = None, data: Path | None = None) -> list[str]:
    return ["likelihood", "--task", "swuggy", "--data", str(data or world["zr"]), "--out", str(out),
            "--cache-dir", str(world["cache"]), *FAST, "--text", "zero", "--batch-size", "3", "--bootstrap", "50",
            *(ckpt or world["ckpt"])["cli_args"], *extra]


def _items(out: Path) -> dict[str, float]:
    with open(out / "items.csv", newline="") as f:
        return {r["file"]: float(r["log_likelihood"]) for r in csv.DictReader(f)}


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != ".moshi-eval.lock"}


def test_a_batch_file_of_another_model_is_scored_again(world, capsys):
    """A likelihood batch file carries its origin: one written by another model is never reused under this one."""
    mine, theirs, fresh = (world["root"] / f"lik_{n}" for n in ("mine", "theirs", "fresh"))
    assert main(_lik(world, theirs, ckpt=world["other_ckpt"])) == 0
    assert main(_lik(world, fresh)) == 0
    assert main(_lik(world, mine)) == 0
    batch = sorted((theirs / "items").glob("batch_*.json"))[0]
    shutil.copy(batch, mine / "items" / batch.name)
    capsys.readouterr()
    assert main(_lik(world, mine)) == 0
    assert "scored under another configuration" in capsys.readouterr().err
    assert _items(mine) == _items(fresh) != _items(theirs)


def test_an_edited_batch_value_is_scored_again(world, capsys):
    out = world["root"] / "lik_edited"
    assert main(_lik(world, out)) == 0
    before = _items(out)
    batch = sorted((out / "items").glob("batch_*.json"))[0]
    stored = json.loads(batch.read_text())
    stored["scores"][0]["log_likelihood"] = 1e9
    batch.write_text(json.dumps(stored))
    capsys.readouterr()
    assert main(_lik(world, out)) == 0
    assert "checksum" in capsys.readouterr().err
    assert _items(out) == before


def test_a_kill_between_the_final_writes_leaves_a_run_no_reader_accepts(world, monkeypatch, capsys):
    """The final files are written first, results.json last naming their sha256: a rerun killed after writing
    items.csv leaves a results.json that does not match it, which compare (and the loggers) refuse."""
    out, other = world["root"] / "lik_killed", world["root"] / "lik_other"
    assert main(_lik(world, out)) == 0
    assert main(_lik(world, other)) == 0
    wav = sorted(world["zr"].rglob("*.wav"))[0]
    original = wav.read_bytes()
    real = folder_module.write_bytes

    def killed_after_items(path, data):
        real(path, data)
        if Path(path).name == "items.csv":
            raise KeyboardInterrupt("signal SIGTERM")
    try:
        wav.write_bytes(original[:44] + bytes(b ^ 1 for b in original[44:]))   # re-recorded: other content
        monkeypatch.setattr(folder_module, "write_bytes", killed_after_items)
        assert main(_lik(world, out)) == 130
        monkeypatch.setattr(folder_module, "write_bytes", real)
        capsys.readouterr()
        assert main(["compare", str(other), str(out), "--out", str(world["root"] / "cmp_killed")]) == 1
        assert "results.json does not match" in capsys.readouterr().err
    finally:
        wav.write_bytes(original)


def test_a_folder_of_the_other_task_is_refused_and_left_as_it_was(world, capsys):
    libri, lik = world["root"] / "task_libri", world["root"] / "task_lik"
    assert main(librilight_args(world, libri, "--max-frames", "12", "--num-books", "1", "--bootstrap", "0")) == 0
    assert main(_lik(world, lik)) == 0
    before = _snapshot(libri), _snapshot(lik)
    capsys.readouterr()
    assert main(_lik(world, libri)) == 1
    assert "holds a librilight run, and this is a likelihood run" in capsys.readouterr().err
    assert main(librilight_args(world, lik, "--max-frames", "12")) == 1
    assert "holds a likelihood run, and this is a librilight run" in capsys.readouterr().err
    assert (_snapshot(libri), _snapshot(lik)) == before
    # Library writes go through the same owner.
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    result = LikelihoodEvaluator(mimi, LikelihoodConfig("swuggy", world["zr"], text="zero", bootstrap=0))(lm)
    with pytest.raises(ConfigMismatchError, match="holds a librilight run"):
        result.write(libri)
    assert _snapshot(libri) == before[0]


def test_a_full_disk_during_a_likelihood_run_names_the_file(world, monkeypatch, capsys):
    out = world["root"] / "lik_full"
    real = folder_module.atomic_write
    seen = []

    def full_disk(path, write):
        if path.suffix == ".json" and path.parent.name == "items":
            seen.append(path)
            if len(seen) == 2:
                raise OSError(28, "No space left on device")
        return real(path, write)
    monkeypatch.setattr(folder_module, "atomic_write", full_disk)
    assert main(_lik(world, out)) == 1
    err = capsys.readouterr().err
    assert f"cannot write {seen[1]}: No space left on device" in err and "Traceback" not in err
    assert [p.name for p in (out / "items").glob("batch_*.json")] == [seen[0].name]


def test_likelihood_compare_pairs_recordings_not_names(world, tmp_path, capsys):
    """Two runs of the same file names, one over a re-recorded file: the pairs with that file are not shared."""
    data = tmp_path / "zr"
    shutil.copytree(world["zr"], data)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_lik(world, a, data=data)) == 0
    wav = sorted(data.rglob("*.wav"))[0]
    pcm = wav.read_bytes()
    wav.write_bytes(pcm[:44] + bytes(x ^ 1 for x in pcm[44:]))
    assert main(_lik(world, b, data=data, ckpt=world["other_ckpt"])) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--bootstrap", "50"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    with open(a / "pairs.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    touching = sum(wav.stem in (p["positive"], p["negative"]) for p in pairs)
    assert touching > 0 and result["shared_pairs"] == len(pairs) - touching
    assert result["notes"] and "pairs both runs scored" in result["notes"][0]


def test_compare_refuses_a_folder_being_written_other_tasks_and_other_text(world, tmp_path, capsys):
    a, b, zero_text = tmp_path / "a", tmp_path / "b", tmp_path / "pad"
    libri = tmp_path / "libri"
    assert main(_lik(world, a)) == 0
    assert main(_lik(world, b, ckpt=world["other_ckpt"])) == 0
    assert main(_lik(world, zero_text, "--text", "pad")) == 0
    assert main(librilight_args(world, libri, "--max-frames", "12", "--num-books", "1", "--bootstrap", "0")) == 0
    with OutputLock(b, "moshi-eval likelihood (another process)"):
        capsys.readouterr()
        assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c1")]) == 1
        assert "a moshi-eval run is writing this folder" in capsys.readouterr().err
    assert main(["compare", str(a), str(libri), "--out", str(tmp_path / "c2")]) == 1
    err = capsys.readouterr().err
    assert f"{a} is a likelihood run" in err and f"{libri} is a librilight run" in err
    assert main(["compare", str(a), str(zero_text), "--out", str(tmp_path / "c3")]) == 1
    assert "text: 'zero'" in capsys.readouterr().err


def _insert_unknown_layer(lm):
    from moshi.modules.streaming import StreamingModule
    from test_check_streaming import AttributeStateLayer
    lm.transformer.layers.insert(1, AttributeStateLayer())
    for module in lm.modules():
        if isinstance(module, StreamingModule):
            module._cached_children = None


def test_every_task_verifies_a_layer_inserted_after_a_first_call(world):
    """Verification holds for a model's streaming structure, not its id: a layer inserted into a model already
    scored is verified at the next call, by the LibriLight and the likelihood task alike."""
    from moshi_eval.scoring.streaming import StreamingCheckError
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    libri = LibriLightEvaluator(mimi, LibriLightConfig(audio_dir=world["audio"], max_frames=20, bootstrap=0,
                                                       chunk=8), use_cache=False)
    lik = LikelihoodEvaluator(mimi, LikelihoodConfig("swuggy", world["zr"], text="predicted", chunk=8, bootstrap=0))
    libri(lm)
    lik(lm)
    _insert_unknown_layer(lm)
    with pytest.raises(StreamingCheckError, match="AttributeStateLayer"):
        libri(lm)
    with pytest.raises(StreamingCheckError, match="AttributeStateLayer"):
        lik(lm)


def test_written_book_files_name_the_chapters_that_were_scored(world, tmp_path):
    """The chapters' identity is taken when the audio is read, not when the result is written."""
    audio = tmp_path / "libri"
    shutil.copytree(world["audio"], audio)
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    evaluator = LibriLightEvaluator(mimi, LibriLightConfig(audio_dir=audio, max_frames=12, bootstrap=0,
                                                           num_books=1), use_cache=False)
    chapter = evaluator.books[0].chapters[0].path
    scored = file_sha256(chapter)
    result = evaluator(lm)
    chapter.write_bytes(chapter.read_bytes()[:-10] + b"0123456789")       # replaced after scoring
    result.write(tmp_path / "out")
    from moshi_eval.files import report
    (path,) = (tmp_path / "out" / "sequences").glob("*.npz")
    _, meta = report.read_sequence(path, with_meta=True)
    assert meta["chapters"][0]["sha256"] == scored != file_sha256(chapter)


def test_loggers_that_cannot_log_stop_the_run_before_it_scores(world, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    out = tmp_path / "out"
    assert main(librilight_args(world, out, "--max-frames", "12", "--wandb", "proj/run")) == 1
    assert "--wandb proj/run: wandb has no API key" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    pytest.importorskip("tensorboard")
    assert main(librilight_args(world, out, "--max-frames", "12", "--tensorboard", str(blocker / "tb"))) == 1
    assert f"--tensorboard {blocker / 'tb'}: cannot write there" in capsys.readouterr().err
    assert not (out / "sequences").exists()


def test_library_writes_respect_the_lock_and_temporaries_of_killed_writes_go(world, tmp_path):
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    result = LikelihoodEvaluator(mimi, LikelihoodConfig("swuggy", world["zr"], text="zero", bootstrap=0))(lm)
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out, "another run"):
        with pytest.raises(OutputBusyError, match="another run"):
            result.write(out)
    stale = out / "items" / ".batch_000000.json.abc.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_text("half")
    result.write(out)
    assert not stale.exists() and (out / "results.json").is_file()
    body = json.loads((out / "results.json").read_text())
    assert body["task"] == "likelihood" and body["metrics"] == result.metrics
    assert body["files"]["items.csv"] == file_sha256(out / "items.csv")


def test_write_on_a_rank_other_than_0_writes_nothing(world, tmp_path):
    from moshi_eval import distributed
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    ranks = distributed.Ranks(rank=1, world=2)
    config = LikelihoodConfig("swuggy", world["zr"], text="zero", bootstrap=0)
    evaluator = LikelihoodEvaluator(mimi, config)
    result = evaluator(lm)
    result.is_main = ranks.is_main
    assert result.write(tmp_path / "rank1") is None and not (tmp_path / "rank1").exists()
    assert np.isfinite(list(result.metrics.values())).all()
    torch.manual_seed(0)


def test_a_folder_of_an_earlier_scoring_version_is_refused_not_mixed(world, tmp_path, capsys):
    """A run folder whose config.json was written by an earlier version of the scoring path (other kernels: numbers
    apart at rounding level) is refused as it is, naming the versions, instead of resuming its units."""
    out = tmp_path / "old"
    assert main(_lik(world, out)) == 0
    config = json.loads((out / "config.json").read_text())
    del config["scoring_version"]                      # as written before the key existed (version 1)
    (out / "config.json").write_text(json.dumps(config))
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_lik(world, out)) == 1
    err = capsys.readouterr().err
    assert "an earlier version of the scoring (scoring_version 1, now 2)" in err and "another --out" in err
    assert _snapshot(out) == before
